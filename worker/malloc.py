"""glibc's malloc, set for processes that pass batches of megabytes along.

By default glibc gives a block of more than 128 KiB (or the size of the largest such block freed so far) fresh
memory from the kernel, and hands the top of its heap back once more than twice that lies free there. A worker
receiving 4 MiB argument batches, and the task process receiving their 1 MB arguments, so map fresh memory for
nearly every message and fault it in page by page: 30,000 page faults and about 40 % of a worker's CPU per
200 MB of arguments here. With blocks of up to 32 MiB served from the heap, and up to 64 MiB of it kept free
for the next message, the same memory is used again. Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("crowdcompute.worker")

#: Blocks up to this size come from the heap (glibc's largest allowed on 64-bit systems).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory kept at the top of the heap before it is handed back to the system.
TRIM_THRESHOLD = 64 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (macOS), or musl's EINVAL
        return False


def reuse_large_blocks() -> bool:
    """Set this process's malloc as the module says; False where it is not glibc's (nothing changes). A process
    started by ``fork`` inherits the setting."""
    if not is_glibc():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # this process's own symbols, glibc's among them
        done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (ImportError, OSError, AttributeError) as exc:  # a Python without ctypes, or no mallopt
        log.debug("malloc settings not applied: %s", exc)
        return False
    return bool(done)
