"""Record shapes: known layouts, the column map, format detection, and normalization.

Every record is first renamed by the column map (`data.columns`, or the built-in map of a known
layout when that is empty), then read in one of four formats:

- text:           prompt, chosen, rejected are strings.
- conversational: prompt is a list of messages (or a string: one user message), chosen and
                  rejected are assistant messages (a list, one message, or a string); an
                  optional `system` string becomes a leading system message (empty: none).
- shared_prefix:  no prompt; chosen and rejected are whole conversations (message lists) or
                  whole text transcripts. The prompt is their common part, cut back to the end
                  of the last non-assistant message (text: to the end of the last
                  `assistant_marker`, e.g. "\n\nAssistant:"); what follows must be assistant
                  turns only, else the pair does not share its prompt cleanly and is refused.
- tokenized:      prompt_ids, chosen_ids, rejected_ids are token id lists, used as they are.

'auto' picks the format from the first readable record of a source; the rest must match.
The result is one of three *kinds* the tokenizer understands: 'text' (strings), 'chat'
(message lists) or 'tokens' (id lists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator, Mapping
from typing import Any

from sdpo_jax.data.errors import DataError, Location, type_name
from sdpo_jax.data.sources import RawSource, Record
from sdpo_jax.data.validation import Problems, require_messages, require_text, require_token_ids

# (name, keys that identify it, the column map it implies). Checked in order.
KNOWN_LAYOUTS = (
    (
        "OpenAI DPO",
        {"input", "preferred_output", "non_preferred_output"},
        {"input.messages": "prompt", "preferred_output": "chosen", "non_preferred_output": "rejected"},
    ),
    ("ShareGPT", {"conversations", "chosen", "rejected"}, {"conversations": "prompt"}),
    ("orca_dpo_pairs", {"system", "question", "chosen", "rejected"}, {"question": "prompt"}),
    (
        "UltraFeedback",
        {"prompt", "prompt_id", "chosen", "rejected", "messages"},
        {"prompt": "", "prompt_id": "", "messages": "", "score_chosen": "", "score_rejected": ""},
    ),
)

FIELDS = {  # format -> (required fields, optional fields)
    "text": (("prompt", "chosen", "rejected"), ()),
    "conversational": (("prompt", "chosen", "rejected"), ("system",)),
    "shared_prefix": (("chosen", "rejected"), ()),
    "tokenized": (("prompt_ids", "chosen_ids", "rejected_ids"), ()),
}


@dataclasses.dataclass
class NormalizedSource:
    """The valid pairs of one source in one kind, with their locations and counts."""

    name: str
    format: str  # the format used (detected or forced)
    layout: str | None  # the known layout recognized, if any
    kind: str  # 'text' | 'chat' | 'tokens'
    unit: str  # 'line' | 'row'
    numbers: list[int]  # line/row number of each pair
    prompt: list[Any]
    chosen: list[Any]
    rejected: list[Any]
    identical: int  # pairs whose chosen and rejected are the same


def parse_columns(columns: str | Mapping[str, str]) -> dict[str, str]:
    """'a=b,c=d' (or a mapping) -> {'a': 'b', 'c': 'd'}; 'a=' drops column a."""
    if isinstance(columns, Mapping):
        return {str(k): str(v or "") for k, v in columns.items()}
    mapping = {}
    for item in filter(None, (part.strip() for part in str(columns).split(","))):
        src, eq, dst = item.partition("=")
        if not eq or not src.strip():
            raise DataError("data.columns", f"expected 'source=destination' items, got {item!r}")
        mapping[src.strip()] = dst.strip()
    return mapping


def normalize(
    raw: RawSource,
    data_format: str,
    columns: Mapping[str, str],
    extra_fields: str,
    assistant_marker: str,
    vocab_size: int,
    problems: Problems,
) -> NormalizedSource:
    """Maps, checks and converts every record of `raw`; invalid ones go to `problems`.

    ``raw``: the records of one source this process reads (sdpo_jax.data.sources.RawSource);
    ``data_format``: ``data.format``, 'auto' (detected from the first readable record) or one of
    the four formats of the module docstring, which every record must then have; ``columns``: the
    parsed column map {source field (dotted for nested): destination field, '' drops it}
    (``parse_columns``); empty applies the built-in map of a recognised known layout;
    ``extra_fields``: ``data.extra_fields``, 'error' refuses fields the format does not use,
    'ignore' passes over them; ``assistant_marker``: the text that starts an assistant turn in
    shared_prefix text transcripts (e.g. "\\n\\nAssistant:"); ``vocab_size``: the model's, for
    checking the ids of the tokenized format (each in [0, vocab_size)); ``problems``: collects
    invalid records (raises the first unless ``data.skip_invalid``).

    The format ('auto') and the kind every record must share come from the source's first
    readable and first valid record, read from `raw.lead` when `raw` is a later shard, so each
    shard of a source is read exactly as the whole source would be.
    """
    lead, seen = iter(raw.lead), []

    def leading() -> Iterator[Record]:  # the records before this shard, each decoded once
        yield from seen
        for record in lead:
            seen.append(record)
            yield record

    first = next((r for r in itertools.chain(leading(), raw.records) if isinstance(r.value, dict)), None)
    mapping, layout = dict(columns), None
    if not mapping and first is not None:
        layout, mapping = _known_layout(first.value)
    fmt = data_format
    if fmt == "auto" and first is not None:
        fmt = _detect(_apply_columns(first.value, mapping, first.where, strict=False))
    out = NormalizedSource(raw.name, fmt, layout, "", raw.unit, [], [], [], [], 0)
    read = functools.partial(
        _read_record,
        mapping=mapping,
        fmt=fmt,
        extra_fields=extra_fields,
        assistant_marker=assistant_marker,
        vocab_size=vocab_size,
    )
    for record in leading():
        with contextlib.suppress(DataError):
            out.kind = read(record)[0]
            break
    for record in raw.records:
        try:
            kind, prompt, chosen, rejected = read(record)
            if out.kind and kind != out.kind:
                chosen_value = _apply_columns(record.value, mapping, record.where, strict=True)["chosen"]
                raise DataError(
                    record.where,
                    f"expected {out.kind} like the first record, got {type_name(chosen_value)}",
                    "chosen",
                    reason="wrong type",
                )
        except DataError as err:
            problems.add(err)
            continue
        out.kind = kind
        out.numbers.append(record.where.number)
        out.prompt.append(prompt)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
        out.identical += chosen == rejected
    return out


def _read_record(
    record: Record, mapping: dict[str, str], fmt: str, extra_fields: str, assistant_marker: str, vocab_size: int
):
    """(kind, prompt, chosen, rejected) of one record, or the DataError saying why not."""
    if isinstance(record.value, DataError):
        raise record.value
    rec = _apply_columns(record.value, mapping, record.where, strict=True)
    _check_fields(rec, fmt, record.where, extra_fields)
    return _READERS[fmt](rec, record.where, assistant_marker, vocab_size)


def _known_layout(record: dict) -> tuple[str | None, dict[str, str]]:
    for name, keys, mapping in KNOWN_LAYOUTS:
        if keys <= set(record):
            return name, {k: v for k, v in mapping.items() if k in record or "." in k}
    return None, {}


def _apply_columns(record: dict, mapping: Mapping[str, str], where: Location, strict: bool) -> dict:
    """Renames per `mapping`; a missing source is an error (`strict`) or left alone."""
    out = dict(record)
    for src, dst in mapping.items():
        value: Any = record
        for part in src.split("."):
            if not isinstance(value, dict) or part not in value:
                if strict:
                    raise DataError(where, "missing (named in the column map)", src, reason="missing field")
                break
            value = value[part]
        else:
            out.pop(src.split(".")[0], None)
            if dst:
                if dst in out:
                    raise DataError(
                        where, f"the column map renames '{src}' onto this existing field", dst, reason="extra field"
                    )
                out[dst] = value
    return out


def _detect(record: dict) -> str:
    if any(k.endswith("_ids") for k in record):
        return "tokenized"
    if "prompt" not in record:
        return "shared_prefix"
    if "system" in record or not all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected")):
        return "conversational"
    return "text"


def _check_fields(rec: dict, fmt: str, where: Location, extra_fields: str) -> None:
    required, optional = FIELDS[fmt]
    for field in required:
        if field not in rec:
            raise DataError(where, f"missing (required by the {fmt} format)", field, reason="missing field")
    if extra_fields == "error":
        for field in rec:
            if field not in required and field not in optional:
                raise DataError(
                    where,
                    f"unexpected in the {fmt} format (map it with "
                    f"data.columns, drop it with data.columns='{field}=', or set "
                    "data.extra_fields=ignore)",
                    field,
                    reason="extra field",
                )


def _read_text(rec, where, marker, vocab_size):
    return ("text",) + tuple(require_text(rec[f], where, f) for f in ("prompt", "chosen", "rejected"))


def _read_conversational(rec, where, marker, vocab_size):
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": require_text(prompt, where, "prompt")}]
    else:
        prompt = require_messages(prompt, where, "prompt")
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(where, f"expected a string, got {type_name(system)}", "system", reason="wrong type")
        if system.strip():
            if prompt[0]["role"] == "system":
                raise DataError(
                    where, "both a system field and a system message in the prompt", "system", reason="extra field"
                )
            prompt = [{"role": "system", "content": system}] + prompt
    chosen, rejected = (_assistant_turns(rec[f], where, f) for f in ("chosen", "rejected"))
    return "chat", prompt, chosen, rejected


def _assistant_turns(value: Any, where: Location, field: str) -> list[dict]:
    if isinstance(value, str):
        value = {"role": "assistant", "content": value}
    messages = require_messages(value, where, field)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise DataError(
                where,
                f"expected assistant messages only, got role '{m['role']}' "
                "(whole conversations: drop the prompt column to use the "
                "shared_prefix format)",
                f"{field}[{i}]",
                reason="wrong type",
            )
    return messages


def _read_shared_prefix(rec, where, marker, vocab_size):
    if isinstance(rec["chosen"], str):
        chosen, rejected = (require_text(rec[f], where, f) for f in ("chosen", "rejected"))
        cut = os.path.commonprefix([chosen, rejected]).rfind(marker)
        prompt = chosen[: cut + len(marker)] if cut >= 0 else ""
        rest = [chosen[len(prompt) :], rejected[len(prompt) :]]
        clean = cut >= 0 and all(marker not in r for r in rest)
        kind = "text"
    else:
        chosen, rejected = (require_messages(rec[f], where, f) for f in ("chosen", "rejected"))
        common = 0  # at most all but the last message, so both keep a completion
        while common < min(len(chosen), len(rejected)) - 1 and chosen[common] == rejected[common]:
            common += 1
        while common and chosen[common - 1]["role"] == "assistant":
            common -= 1
        prompt = chosen[:common]
        rest = [chosen[common:], rejected[common:]]
        clean = bool(prompt) and all(m["role"] == "assistant" for r in rest for m in r)
        kind = "chat"
    if not clean:
        raise DataError(
            where,
            "chosen and rejected do not share a prompt that ends at their last assistant turn",
            "chosen",
            reason="no shared prompt",
        )
    for field, completion in zip(("chosen", "rejected"), rest):
        if kind == "text" and not completion.strip():
            raise DataError(where, "empty completion after the shared prompt", field, reason="empty string")
    return kind, prompt, rest[0], rest[1]


def _read_tokenized(rec, where, marker, vocab_size):
    return ("tokens",) + tuple(
        require_token_ids(rec[f], where, f, vocab_size) for f in ("prompt_ids", "chosen_ids", "rejected_ids")
    )


_READERS = {
    "text": _read_text,
    "conversational": _read_conversational,
    "shared_prefix": _read_shared_prefix,
    "tokenized": _read_tokenized,
}
