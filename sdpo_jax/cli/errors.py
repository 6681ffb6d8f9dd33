"""The one way every command reports a user error: one line on stderr, exit status 2."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

USER_ERROR_EXIT_CODE = 2


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Turn the errors that bad input raises into `command: error: <first line>` and exit 2."""
    from sdpo_jax.checkpoint.gguf_import import GGUFImportError
    from sdpo_jax.checkpoint.hf_import import CheckpointError
    from sdpo_jax.data.errors import DataError

    try:
        yield
    except (DataError, CheckpointError, GGUFImportError, ValueError, FileNotFoundError) as err:
        print(f"{command}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
