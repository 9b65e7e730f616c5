"""Give memory the daemon freed back to the operating system.

CPython returns a freed object's memory to its allocator, not to the system: after start-up
(100,000 detector states read from JSON, the JSON dropped) and after bursts of polls, the
C heap keeps pages nobody uses, and they count in the RSS a container limit watches. glibc's
``malloc_trim(0)`` releases them (a few milliseconds for a heap of 100 MB). Elsewhere (musl,
macOS) this is a no-op. It runs on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked  # noqa: PLW0603 - looked up once, on first use
    if not _looked:
        _looked = True
        try:
            # the symbols the process already has: no library search (find_library would
            # run ldconfig), and glibc's malloc_trim where the C library is glibc
            _trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        except OSError:
            _trim = None
    return _trim


def trim_now() -> bool:
    """Hand the C heap's free pages back to the OS; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def release_free_memory() -> bool:
    """:func:`trim_now` on a worker thread: after heavy allocation it takes 10 ms or more, and
    ctypes lets go of the GIL meanwhile, so polling goes on."""
    return await asyncio.to_thread(trim_now)
