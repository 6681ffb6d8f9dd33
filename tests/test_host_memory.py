"""retain_host_allocations: a large block freed by a worker thread is reused, not mapped afresh; and
sdpo-train's train.host_allocator choice (auto: only when JAX runs on the CPU)."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("platforms, cpu_only", [("cpu", True), ("cuda", False), ("cpu,tpu", False), ("tpu", False)])
def test_auto_reads_the_platforms_jax_was_told(monkeypatch, platforms, cpu_only):
    from sdpo_jax.host_memory import jax_runs_on_cpu_only

    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert jax_runs_on_cpu_only() is cpu_only


def test_auto_sees_an_installed_accelerator_plugin(monkeypatch):
    """Without JAX_PLATFORMS, an installed libtpu (or a jax_plugins module: CUDA, ROCm) means an accelerator."""
    import importlib.util

    from sdpo_jax import host_memory

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("jax_platforms", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a)
    )
    assert host_memory.jax_runs_on_cpu_only() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize(
    "choice, platforms, applied",
    [("system", "cpu", False), ("auto", "cuda", False), ("auto", "cpu", True), ("retain", "cuda", True)],
)
def test_the_choice_applies_the_settings_or_not(choice, platforms, applied):
    script = (
        "from sdpo_jax.host_memory import apply_host_allocator, host_allocations_retained\n"
        f"print(apply_host_allocator({choice!r}), host_allocations_retained())"
    )
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [str(applied), str(applied)]
