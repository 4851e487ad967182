"""``python -m gpuserial``: the ``gpuserial`` command."""

from gpuserial.tools.cli import main

raise SystemExit(main())
