"""The one error type of the data pipeline, and the CLI helper that turns it into exit code 2.

Every refusal is a `DataError` whose message is a single line naming where the problem is:

    data error: train.jsonl line 17, field 'chosen': expected a non-empty string, got int

Files read line by line (.jsonl, .jsonl.gz) are located by 1-based line number (what an editor
shows); everything else (.json lists, .parquet, hub datasets) by 0-based row index (what
`dataset[i]` takes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator

from sdpo_jax.errors import SdpoError

EXIT_CODE = 2


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record came from: source name, `unit` ('line' or 'row') and its number."""

    source: str
    unit: str = "row"
    number: int | None = None

    def __str__(self) -> str:
        if self.number is None:
            return self.source
        return f"{self.source} {self.unit} {self.number}"


class DataError(SdpoError, ValueError):
    """Bad input data or data settings; the message is one line starting with 'data error: '.

    `reason` is a short stable key ('invalid JSON', 'wrong type', ...) used to count skipped rows
    when `data.skip_invalid` is on.
    """

    def __init__(self, where: Location | str, detail: str, field: str | None = None, reason: str = "invalid"):
        self.where = where
        self.field = field
        self.detail = " ".join(str(detail).split())  # keep it on one line
        self.reason = reason
        place = str(where)
        if field is not None:
            place += f", field '{field}'"
        super().__init__(f"data error: {place}: {self.detail}")


def type_name(value: object) -> str:
    """JSON-flavoured name of a value's type for messages ('string', 'list', 'int', 'null')."""
    names = {str: "string", list: "list", dict: "object", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@contextlib.contextmanager
def exit_on_data_error() -> Iterator[None]:
    """CLI wrapper: print a `DataError` as its one line on stderr and exit with status 2."""
    try:
        yield
    except DataError as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None
