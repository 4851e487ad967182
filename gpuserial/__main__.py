"""``python -m gpuserial``: the ``gpuserial`` command."""

from gpuserial.cli import main

raise SystemExit(main())
