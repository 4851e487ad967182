"""The engine that moves arrays: the array backends and devices (``devices``, the only importer
of CuPy, torch, JAX and ml_dtypes), the pinned staging pool and its pipelines (``transfer``),
asynchronous saves (``asyncsave``), progress bars (``progress``) and the threads that deflate
and inflate beside the caller (``workers``)."""
