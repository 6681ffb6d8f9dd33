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
and large). Call it before JAX starts its backend (``jax.devices()``, the first computation): the
CPU worker threads it creates then take their arena, and settings made later leave the step buffer
where it was (measured: ~37,000 minor faults per step before and after a late call, 0 after an
early one; docs/performance.md).

``apply_host_allocator(choice)`` is what sdpo-train does with ``train.host_allocator``: "retain"
applies the settings, "system" leaves malloc as configured, "auto" applies them when JAX will run
on the CPU (``JAX_PLATFORMS`` names only cpu, or no accelerator plugin is installed: no libtpu, no
``jax_plugins`` module); an accelerator's host gains nothing from them and would keep up to 2 GiB
of freed host memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 2**31 - 1
HOST_ALLOCATORS = ("auto", "retain", "system")
_RETAINED = False


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
    global _RETAINED
    _RETAINED = all(mallopt(option, value) == 1 for option, value in settings)
    return _RETAINED


def host_allocations_retained() -> bool:
    """Whether ``retain_host_allocations`` has applied its settings in this process."""
    return _RETAINED


def jax_runs_on_cpu_only() -> bool:
    """Whether JAX will find no backend but the CPU, told without starting one: ``JAX_PLATFORMS`` (or
    ``jax_platforms``) names only cpu, or no accelerator plugin is installed (libtpu, a module under the
    ``jax_plugins`` namespace or a ``jax_plugins`` entry point: how JAX finds GPU and TPU backends)."""
    platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("jax_platforms", "")).strip()
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    namespace = importlib.util.find_spec("jax_plugins")
    return namespace is None or not any(pkgutil.iter_modules(namespace.submodule_search_locations or []))


def apply_host_allocator(choice: str) -> bool:
    """Apply ``train.host_allocator`` (module docstring) before JAX starts; True when the settings are on."""
    if choice == "retain" or (choice == "auto" and jax_runs_on_cpu_only()):
        return retain_host_allocations()
    return False
