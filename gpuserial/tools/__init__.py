"""The tools built on the package: the ``gpuserial`` command (``cli``), file inspection, checks
and repairs (``inspection``), the throughput table (``bench``) and the demo (``demo``)."""
