"""Reading raw preference records from local files, dataset folders and hub dataset names.

A source string is `PATH_OR_NAME[@SPLIT]`. `sample:NAME/FILE` points into the samples shipped
in this package (`sdpo_jax/data/samples/`). Files are read by this module itself (not by
`datasets`) so that every bad byte or line can be reported with its line number:

- .jsonl / .jsonl.gz: one JSON object per line; blank lines are ignored; located by line (1-based).
- .json: a JSON list of objects; located by row (0-based).
- .parquet: located by row (0-based).
- anything else (a folder, or a hub name such as `Intel/orca_dpo_pairs`): `datasets.load_dataset`.

Undecodable records do not raise here: they become `Record`s holding a `DataError`, so that the
caller can either stop at the first or skip and count them (`data.skip_invalid`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from sdpo_jax.data.errors import DataError, Location, type_name

SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclasses.dataclass
class Record:
    """One raw record: its location and either the decoded object or why it could not be read."""

    where: Location
    value: dict | DataError


@dataclasses.dataclass
class RawSource:
    """The records of one source this process reads: all of them, or its shard.

    `lead` yields, decoded on demand, the records before the shard (empty for the whole source),
    so that a shard can find the source's first record (format and kind detection) without
    reading the rest. `unit` is 'line' or 'row'.
    """

    name: str
    records: list[Record]
    unit: str = "row"
    lead: Iterable[Record] = ()


def shard_bounds(total: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard `index` of `count` contiguous, in-order shards of `total` items."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    return total * index // count, total * (index + 1) // count


def parse_spec(spec: str, default_split: str) -> tuple[str, str]:
    """Splits 'path_or_name@split' (the split part must not contain '/'); resolves `sample:`."""
    name, split = spec, default_split
    head, at, tail = spec.rpartition("@")
    if at and head and tail and "/" not in tail:
        name, split = head, tail
    if name.startswith("sample:"):
        name = os.path.join(SAMPLES_DIR, name[len("sample:") :])
    return name, split


def local_source_problem(spec: str) -> str | None:
    """Why `spec` cannot be read when it names a local file (missing, a folder, unreadable), else None.

    Folders and hub names are not looked at here: whether a hub name exists needs the network.
    """
    name, _ = parse_spec(spec, "train")
    if not name.endswith(FILE_SUFFIXES):
        return None
    if not os.path.exists(name):
        return "no such file"
    if not os.path.isfile(name):
        return "not a file"
    if not os.access(name, os.R_OK):
        return "not readable (permission denied)"
    return None


def read_source(
    spec: str, default_split: str = "train", limit: int = 0, sample_seed: int = 0, shard: tuple[int, int] = (0, 1)
) -> RawSource:
    """Reads one source; `limit` > 0 keeps that many records (a seeded sample if `sample_seed`).

    With `shard=(i, n)` only the i-th of n contiguous blocks of those records is decoded (JSON
    lines parsed, hub rows materialized); the other records are not read beyond what locating the
    block needs (a .jsonl's line breaks, a .json list's parse, a parquet table).
    """
    name, split = parse_spec(spec, default_split)
    if name.endswith(FILE_SUFFIXES):
        if not os.path.isfile(name):
            raise DataError(name, "file not found", reason="missing file")
        with open(name, "rb") as f:
            data = f.read()
        if name.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as err:
                raise DataError(name, f"not a readable gzip file ({err})", reason="unreadable file") from None
        if not data.strip():
            raise DataError(name, "file is empty", reason="empty file")
        if name.endswith((".jsonl", ".jsonl.gz")):
            lines = [(i + 1, line) for i, line in enumerate(data.split(b"\n")) if line.strip()]
            items, decode, unit = _select(lines, limit, sample_seed), lambda item: _jsonl_record(name, *item), "line"
        elif name.endswith(".json"):
            items, decode, unit = _select(_json_records(name, data), limit, sample_seed), _same, "row"
        else:
            return _table_shard(name, _parquet_table(name), limit, sample_seed, shard)
        start, stop = shard_bounds(len(items), *shard)
        if not items:
            raise DataError(name, "file is empty", reason="empty file")
        return RawSource(
            name=name,
            records=[decode(item) for item in items[start:stop]],
            unit=unit,
            lead=(decode(item) for item in items[:start]),
        )
    return _table_shard(name, _load_dataset(name, split), limit, sample_seed, shard)


def _table_shard(name: str, table, limit: int, sample_seed: int, shard: tuple[int, int]) -> RawSource:
    """The shard of a parquet table or `datasets.Dataset`: only its rows become Python objects."""
    rows = _select(list(range(len(table))), limit, sample_seed)
    if not rows:
        raise DataError(
            name, "file is empty" if name.endswith(FILE_SUFFIXES) else "dataset has no rows", reason="empty file"
        )
    start, stop = shard_bounds(len(rows), *shard)
    values = _to_list(table, rows[start:stop]) if stop > start else []
    return RawSource(
        name=name,
        records=[Record(Location(name, "row", i), v) for i, v in zip(rows[start:stop], values)],
        lead=(Record(Location(name, "row", i), _to_list(table, [i])[0]) for i in rows[:start]),
    )


def _to_list(table, rows: list[int]) -> list[dict]:
    """Rows of a pyarrow table or a `datasets.Dataset` as dicts."""
    import pyarrow as pa

    return table.take(rows).to_pylist() if isinstance(table, pa.Table) else table.select(rows).to_list()


def _same(record: Record) -> Record:
    return record


def source_fingerprint(spec: str, default_split: str = "train") -> str:
    """A hash of the source's content (files) or the `datasets` fingerprint (hub, folders)."""
    name, split = parse_spec(spec, default_split)
    if name.endswith(FILE_SUFFIXES):
        if not os.path.isfile(name):
            raise DataError(name, "file not found", reason="missing file")
        h = hashlib.blake2b(digest_size=16)
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return f"{_load_dataset(name, split)._fingerprint}:{split}"


def _select(items: list, limit: int, sample_seed: int) -> list:
    if limit <= 0 or len(items) <= limit:
        return items
    if sample_seed:
        keep = np.sort(np.random.default_rng(sample_seed).choice(len(items), limit, replace=False))
        return [items[i] for i in keep]
    return items[:limit]


def _jsonl_record(path: str, number: int, line: bytes) -> Record:
    where = Location(path, "line", number)
    try:
        text = line.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return Record(
            where,
            DataError(
                where, f"invalid UTF-8 byte 0x{line[err.start]:02x} at column {err.start + 1}", reason="invalid UTF-8"
            ),
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return Record(where, DataError(where, f"invalid JSON ({err.msg} at column {err.colno})", reason="invalid JSON"))
    return Record(where, _require_object(where, value))


def _json_records(path: str, data: bytes) -> list[Record]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            Location(path, "line", line), f"invalid UTF-8 byte 0x{data[err.start]:02x}", reason="invalid UTF-8"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            Location(path, "line", err.lineno), f"invalid JSON ({err.msg} at column {err.colno})", reason="invalid JSON"
        ) from None
    if not isinstance(value, list):
        raise DataError(path, f"expected a JSON list of records, got {type_name(value)}", reason="wrong type")
    return [Record(Location(path, "row", i), _require_object(Location(path, "row", i), v)) for i, v in enumerate(value)]


def _parquet_table(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(path, f"not a readable parquet file ({err})", reason="unreadable file") from None


def _load_dataset(name: str, split: str):
    import datasets

    if os.path.sep in name and not os.path.exists(name) and name.startswith((".", os.path.sep)):
        raise DataError(name, "file not found", reason="missing file")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (missing, offline, bad split, ...)
        raise DataError(name, f"cannot load dataset split '{split}' ({err})", reason="unreadable file") from None
    return ds


def _require_object(where: Location, value: Any) -> dict | DataError:
    if isinstance(value, dict):
        return value
    return DataError(where, f"expected a JSON object, got {type_name(value)}", reason="wrong type")
