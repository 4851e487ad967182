"""The engine that moves arrays: the array backends and devices (``devices``, the only importer
of CuPy, torch, JAX and ml_dtypes), the pinned staging pool and its pipelines (``transfer``),
asynchronous saves (``asyncsave``) and progress bars (``progress``)."""
