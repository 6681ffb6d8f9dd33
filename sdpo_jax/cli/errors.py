"""How every command ends on an exception: a user's mistake in one line, a bug with its traceback.

Three kinds, told apart by type:

- the user's input (the project's error types, `sdpo_jax.errors.SdpoError` and its subclasses: a
  config field, a command-line option, a data file, a checkpoint, a run folder):
  ``<command>: error: <one line>`` on stderr, exit status 2;
- the environment (a missing package, a file that cannot be read or written, a full disk, no memory
  left on the host or the device): the same, one line and exit status 2;
- anything else is a bug in sdpo_jax: its traceback as Python prints it, then
  ``<command>: internal error: ...`` naming the exception, exit status 70 (sysexits' EX_SOFTWARE;
  not 1, which sdpo-plan uses for "does not fit").
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

USER_ERROR_EXIT_CODE = 2
INTERNAL_ERROR_EXIT_CODE = 70


def environment_problem(err: BaseException) -> str | None:
    """One line for an error of the machine rather than of the input, else None."""
    if isinstance(err, ModuleNotFoundError):
        return f"a required package is missing: {err} (reinstall with `pip install -e .`)"
    if isinstance(err, MemoryError):
        return "out of host memory"
    if isinstance(err, OSError):
        return _one_line(err) or type(err).__name__
    if type(err).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(err):
        advice = "lower train.batch_size, raise train.grad_accum or use model.remat=full"
        return f"out of device memory: {_one_line(err)} ({advice})"
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _bug_line(command: str, err: BaseException) -> str:
    """The line printed after a bug's traceback: what it is and what to do with it."""
    return (
        f"{command}: internal error: this is a bug in sdpo_jax, please report it with the traceback above "
        f"({type(err).__name__}: {_one_line(err)})"
    )


def _exit(line: str, code: int) -> NoReturn:
    print(line, file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Report an exception of the block as the module docstring says, and exit (2 or 70)."""
    from sdpo_jax.errors import SdpoError

    try:
        yield
    except SdpoError as err:
        _exit(f"{command}: error: {_one_line(err)}", USER_ERROR_EXIT_CODE)
    except Exception as err:  # noqa: BLE001 (the environment's in one line, anything else as a bug)
        problem = environment_problem(err)
        if problem is not None:
            _exit(f"{command}: error: {problem}", USER_ERROR_EXIT_CODE)
        traceback.print_exc()
        _exit(_bug_line(command, err), INTERNAL_ERROR_EXIT_CODE)
