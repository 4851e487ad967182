"""Progress bars for long saves, loads and conversions: bytes and throughput, on a terminal only.

The save/load paths and ``gpuserial convert`` call :func:`bar` with the total bytes they will
move and :meth:`Progress.update` as each chunk goes through. With ``enabled=None`` (the default
of every ``progress=`` argument) a bar is shown only when stderr is a terminal and the total is at
least :data:`THRESHOLD_BYTES`; ``True`` forces one, ``False`` turns it off. tqdm is imported only
when a bar is actually shown.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TextIO

__all__ = ['THRESHOLD_BYTES', 'Progress', 'bar', 'counted', 'should_show']

THRESHOLD_BYTES = 256 << 20  # below this, an automatic bar would only flicker
MIN_INTERVAL_S = 0.2  # at most five redraws a second


class Progress(Protocol):
    """What :func:`bar` yields."""

    def update(self, nbytes: int) -> None:
        """Counts ``nbytes`` more bytes done."""


class _Silent:
    """The bar that shows nothing."""

    def update(self, nbytes: int) -> None:
        pass


SILENT: Progress = _Silent()


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def should_show(total_bytes: int, enabled: bool | None, stream: TextIO | None = None) -> bool:
    """Whether a bar of ``total_bytes`` is shown (see the module's rule for ``enabled=None``).

    Args:
        total_bytes: the bytes the operation will move.
        enabled: True or False to decide, None to decide by terminal and size.
        stream: where the bar would go (default ``sys.stderr``).
    """
    if enabled is not None:
        return bool(enabled)
    return total_bytes >= THRESHOLD_BYTES and _is_terminal(sys.stderr if stream is None
                                                            else stream)


@contextlib.contextmanager
def bar(total_bytes: int | Callable[[], int], desc: str, enabled: bool | None = None, *,
        stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress bar over ``total_bytes`` bytes, as a context manager.

    Args:
        total_bytes: the bytes the operation will move (the bar's 100%), or a function that
            counts them, called only where a bar may be shown.
        desc: a short label, such as ``'save model.npz'``.
        enabled: True shows a bar, False shows none, None (the default) shows one only when
            ``stream`` is a terminal and ``total_bytes >= THRESHOLD_BYTES``.
        stream: where to draw (default ``sys.stderr``).

    Yields:
        An object whose ``update(nbytes)`` counts bytes done; a silent one when no bar is shown.
        The bar is closed (and cleared) when the block ends, whether or not it succeeded.
    """
    stream = sys.stderr if stream is None else stream
    if callable(total_bytes):  # counted only where a bar of any size would show
        total_bytes = total_bytes() if should_show(THRESHOLD_BYTES, enabled, stream) else 0
    if not should_show(total_bytes, enabled, stream):
        yield SILENT
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth failing a save
        yield SILENT
        return

    with tqdm(total=total_bytes, desc=desc, unit='B', unit_scale=True, unit_divisor=1024,
              file=stream, leave=False, dynamic_ncols=True, mininterval=MIN_INTERVAL_S) as shown:
        yield shown


def counted(chunks: Iterable, progress: Progress) -> Iterator:
    """Yields ``chunks`` (bytes-like) unchanged, counting each one's length on ``progress``."""
    for chunk in chunks:
        yield chunk
        progress.update(memoryview(chunk).nbytes)
