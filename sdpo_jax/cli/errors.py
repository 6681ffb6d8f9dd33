"""The one way every command reports a problem it cannot go on from: one line on stderr, exit status 2.

Two kinds are told in one line: the user's input (the project's error types, sdpo_jax.errors, and
the input checks that raise ValueError) and the environment (a missing package, a file that cannot
be read or written, a full disk, no memory left on the host or the device). Anything else keeps
its traceback.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

USER_ERROR_EXIT_CODE = 2


def environment_problem(err: BaseException) -> str | None:
    """One line for an error of the machine rather than of the input, else None."""
    if isinstance(err, ModuleNotFoundError):
        return f"a required package is missing: {err} (reinstall with `pip install -e .`)"
    if isinstance(err, MemoryError):
        return "out of host memory"
    if isinstance(err, OSError):
        return _one_line(err) or type(err).__name__
    if type(err).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(err):
        return f"out of device memory: {_one_line(err)} (lower train.batch_size, raise train.grad_accum or use model.remat=full)"
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Turn input and environment errors into ``command: error: <one line>`` and exit 2."""
    from sdpo_jax.checkpoint.gguf_import import GGUFImportError
    from sdpo_jax.checkpoint.hf_import import CheckpointError
    from sdpo_jax.data.errors import DataError
    from sdpo_jax.errors import SdpoError

    try:
        yield
    except (SdpoError, DataError, CheckpointError, GGUFImportError, ValueError) as err:
        print(f"{command}: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except Exception as err:  # noqa: BLE001 (re-raised unless it is the environment's)
        problem = environment_problem(err)
        if problem is None:
            raise
        print(f"{command}: error: {problem}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
