"""retain_host_allocations: a large block freed by a worker thread is reused, not mapped afresh."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A worker thread mallocs, touches and frees 128 MiB (like XLA's per-step temporary buffer) three
# times; the script prints the minor page faults of the last two rounds.
_SCRIPT = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    from sdpo_jax.host_memory import retain_host_allocations
    applied = retain_host_allocations() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 128 << 20

    def step():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)

    def in_thread():
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()

    in_thread()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    in_thread()
    in_thread()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_large_block_is_reused_without_page_faults():
    pages = 2 * (128 << 20) // 4096  # two rounds of 128 MiB in 4 KiB pages
    applied, retained = _faults("retain")
    _, plain = _faults("plain")
    assert applied == "True"
    assert plain > pages // 2, plain  # without: every round faults the block in again
    assert retained < pages // 20, retained  # with: the second and third rounds reuse the pages
