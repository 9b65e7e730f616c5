"""Give memory the daemon freed back to the operating system.

CPython returns a freed object's memory to its allocator, not to the system: after start-up
(100,000 detector states read from JSON, the JSON dropped) and after bursts of polls, the
C heap keeps pages nobody uses, and they count in the RSS a container limit watches. glibc's
``malloc_trim(0)`` releases them (a few milliseconds for a heap of 100 MB). Elsewhere (musl,
macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked  # noqa: PLW0603 - looked up once, on first use
    if not _looked:
        _looked = True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        _trim = getattr(libc, "malloc_trim", None)
    return _trim


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
