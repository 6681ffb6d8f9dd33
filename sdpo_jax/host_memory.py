"""Keep large host allocations mapped between steps (glibc's malloc, the CPU backend).

XLA's CPU runtime allocates each execution's temporary buffer (122 MB for the DPO step of
benchmarks/throughput.py) on a worker thread and frees it when the execution ends. glibc serves a
block that large with a fresh ``mmap``: a worker thread's secondary arena cannot hold a block over
its 64 MB heap, and the ``mmap`` threshold never exceeds 32 MB. So every step faults in (and the
kernel zeroes) every page of the buffer again: about 30,000 minor page faults per step measured
there, against about 1,500 with the settings below.

``retain_host_allocations`` sets, through ``mallopt``: one arena for all threads (M_ARENA_MAX = 1),
no ``mmap`` for large blocks (M_MMAP_MAX = 0) and no trimming of the heap's free top below 2 GiB
(M_TRIM_THRESHOLD), so a freed step buffer stays in the heap and the next step reuses it.
Costs: memory freed below that 2 GiB stays with the process (its resident size keeps its high-water
mark), and all threads share one arena (more lock contention for small allocations; XLA's are few
and large). Call it before the first JAX computation: the arena limit applies to threads that have
not allocated yet, and JAX starts its CPU worker threads with the backend.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 2**31 - 1


def retain_host_allocations() -> bool:
    """Apply the allocator settings of the module docstring; False where there is no glibc malloc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    return all(mallopt(option, value) == 1 for option, value in settings)
