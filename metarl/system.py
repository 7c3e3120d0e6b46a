"""Process-level settings that make metarl's large tensor work fast on Linux.

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB, even after its
dynamic adjustment) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A MAML-TRPO update at
the standard batch (40 tasks x 20 episodes x 200 steps) allocates and frees tensors of 40 MiB and more
hundreds of times (every Hessian-vector product of conjugate gradient), so each one is zero-filled page by
page again by the kernel: measured here, 18 s of a 26 s update was system time in page faults. Raising the
mmap threshold (and the heap trim threshold) lets freed blocks be reused: the same update took 8 s.

`keep_freed_memory` applies that with ``mallopt``. It is process-wide and only affects speed (the heap keeps
up to its peak size instead of shrinking back); it is a no-op outside glibc. The agents and the sampler
workers call it; set ``METARL_MALLOC_TUNING=0`` to leave ``malloc`` alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_applied: bool | None = None


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve allocations below ``threshold`` bytes from the reusable heap; returns whether it applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("METARL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Older glibc caps M_MMAP_THRESHOLD at 32 MiB (too low for these tensors) and rejects larger values;
    # there, stop using mmap for allocations altogether (M_MMAP_MAX 0), which has the same effect.
    heap_only = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold))) or bool(mallopt(_M_MMAP_MAX, 0))
    keep = bool(mallopt(_M_TRIM_THRESHOLD, int(threshold)))
    _applied = heap_only and keep
    return _applied
