"""The error hierarchy: one base class, each kind also the standard exception a caller catches."""


class GpuserialError(Exception):
    """Base class of every error gpuserial raises."""

    # Set on an error that stopped a load while it filled arrays in place (see loading):
    filled: list[str]  # the arrays already filled
    partly_filled: str  # the array being filled, which may hold part of the data


class KeyNotFoundError(GpuserialError, KeyError):
    """A key the target asks for is not in the file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ''


class MismatchError(GpuserialError, ValueError):
    """A stored array's shape or dtype does not fit the target."""


class DtypeMismatchError(MismatchError, TypeError):
    """A stored array's dtype does not cast to the target's: also a ``TypeError``, which
    ``numpy.copyto`` raises in Chainer's loads."""


class InvalidKeyError(GpuserialError, ValueError):
    """A key is not a string, or is empty."""


class KeyCollisionError(GpuserialError, ValueError):
    """Two entries of one save would be stored under the same key (or a key and its group)."""


class CorruptFileError(GpuserialError, ValueError):
    """A file is not a valid NPZ/HDF5 file, is truncated, or fails its checksum."""


class ReadFailedError(GpuserialError, OSError):
    """Reading a file failed (an I/O or network error), not its content: the file may be
    whole, and a later try may read it."""


class UnsafeFileError(CorruptFileError):
    """A file holds something that loading would have to execute (a pickle)."""


class UnsafeCastError(GpuserialError, TypeError):
    """A stored scalar does not cast safely to the target's type."""


class UnstorableValueError(GpuserialError, TypeError):
    """A value no member or dataset can hold: an object other than an array, a number, a
    string or None, a ragged list, a dtype the format or NumPy has no type for."""


class DeviceError(GpuserialError, ValueError):
    """A device spec is unknown, or names a device that is not usable here."""


def where(file: object, key: str | None = None) -> str:
    """The `file 'x', key 'y'` phrase every message starts with."""
    name = getattr(file, 'name', file)
    text = f'{name!r}' if isinstance(name, str) else f'<{type(file).__name__}>'
    return f'{text}, key {key!r}' if key is not None else text


# The errors of a failed write or read that name no file, as the OS raises them
_NAMELESS = (OSError, BlockingIOError, InterruptedError, PermissionError, TimeoutError)


def naming(error: OSError, name: str, doing: str) -> OSError:
    """``error``, of a call that names no file (a write, an fsync, an upload), as the same
    error naming the file or object ``name`` and what was being done, with its traceback; any
    other error as it is."""
    if error.filename is not None or error.errno is None or type(error) not in _NAMELESS:
        return error
    named = type(error)(error.errno, f'{error.strerror} ({doing})', name)
    return named.with_traceback(error.__traceback__)
