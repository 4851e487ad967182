"""Where the bytes go: local files written atomically, paths and binary file objects handled
alike (``_fileio``), and Ctrl-C held while HDF5 runs and raised between blocks (``_signals``)."""
