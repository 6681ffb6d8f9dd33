"""Field checks for raw records, and the collector that stops at or counts invalid records.

Each check returns the cleaned value or raises a one-line `DataError` naming the location and
the field. `Problems` decides what an error does: raise (the default) or, with
`data.skip_invalid`, drop the record and count it under the error's `reason`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from sdpo_jax.data.errors import DataError, Location, type_name

# ShareGPT speaker names and the chat roles they stand for.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant", "tool")


def require_text(value: Any, where: Location, field: str) -> str:
    """A string with at least one non-space character."""
    if not isinstance(value, str):
        raise DataError(where, f"expected a non-empty string, got {type_name(value)}", field, reason="wrong type")
    if not value.strip():
        raise DataError(where, "expected a non-empty string, got an empty string", field, reason="empty string")
    return value


def require_messages(value: Any, where: Location, field: str) -> list[dict]:
    """A non-empty list of {role, content} (or ShareGPT {from, value}) messages, normalized."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(where, f"expected a list of messages, got {type_name(value)}", field, reason="wrong type")
    if not value:
        raise DataError(where, "expected a non-empty list of messages, got an empty list", field, reason="empty string")
    return [_message(m, where, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(value: Any, where: Location, field: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(where, f"expected a message object, got {type_name(value)}", field, reason="wrong type")
    if "from" in value and "value" in value and "role" not in value:
        role = SHAREGPT_ROLES.get(value["from"])
        if role is None:
            raise DataError(
                where,
                f"unknown speaker {value['from']!r} (known: {', '.join(sorted(SHAREGPT_ROLES))})",
                field,
                reason="wrong type",
            )
        value = {"role": role, "content": value["value"]}
    extra = sorted(set(value) - {"role", "content"})
    if extra or "role" not in value or "content" not in value:
        detail = (
            f"unexpected key '{extra[0]}'" if extra else f"missing key '{'role' if 'role' not in value else 'content'}'"
        )
        raise DataError(
            where,
            f"expected a message with 'role' and 'content': {detail}",
            field,
            reason="extra field" if extra else "missing field",
        )
    if value["role"] not in CHAT_ROLES:
        raise DataError(
            where, f"unknown role {value['role']!r} (known: {', '.join(CHAT_ROLES)})", field, reason="wrong type"
        )
    return {"role": value["role"], "content": require_text(value["content"], where, f"{field}.content")}


def require_token_ids(value: Any, where: Location, field: str, vocab_size: int) -> list[int]:
    """A non-empty list of ints in [0, vocab_size)."""
    if not isinstance(value, list):
        raise DataError(
            where, f"expected a non-empty list of token ids, got {type_name(value)}", field, reason="wrong type"
        )
    if not value:
        raise DataError(
            where, "expected a non-empty list of token ids, got an empty list", field, reason="empty string"
        )
    for i, token in enumerate(value):
        if not isinstance(token, int) or isinstance(token, bool):
            raise DataError(
                where, f"expected integer token ids, got {type_name(token)} at position {i}", field, reason="wrong type"
            )
    problem = token_range_problem(value, vocab_size)
    if problem:
        raise DataError(where, problem, field, reason="token id out of range")
    return value


def token_range_problem(ids: Sequence[int], vocab_size: int) -> str | None:
    """Describes the first id outside [0, vocab_size), or None when all are inside."""
    if not ids:
        return None
    low, high = min(ids), max(ids)
    if low < 0:
        return f"token id {low} is negative"
    if high >= vocab_size:
        return f"token id {high} is outside the vocabulary (size {vocab_size})"
    return None


class Problems:
    """Raises the first `DataError`, or with `skip_invalid` counts them per reason."""

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def add(self, err: DataError) -> None:
        if not self.skip_invalid:
            raise err
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))
