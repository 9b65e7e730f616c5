"""Freed memory goes back to the operating system (glibc's malloc_trim), measured in /proc."""

from __future__ import annotations

import os
import platform
import resource

import pytest

from daemon.memory import trim_now


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)
def test_freed_heap_pages_are_returned() -> None:
    """1. 160 MB of 16 KiB blocks on the C heap, then three of every four freed (the kept
    ones pin the heap's top) 2. RSS still holds most of it 3. trim_now() says it
    trimmed and RSS drops by more than 60 MB."""
    blocks = [os.urandom(16) * 1024 for _ in range(10_000)]  # 16 KiB each: malloc, not pymalloc
    kept = blocks[3::4]
    del blocks
    before = rss_bytes()
    assert trim_now() is True
    after = rss_bytes()
    assert before - after > 60_000_000, (before, after)
    assert len(kept) == 2_500
