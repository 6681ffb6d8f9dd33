"""On-disk cache of tokenized sources, keyed by everything that determines their content.

A key is the hash of: a format version, the source fingerprint (file content hash or the
`datasets` fingerprint), the reading/format settings, the tokenizer identity and the vocab
size. An entry is a saved `datasets.Dataset` plus `meta.json` (counts of skipped/identical/
boundary-merged pairs, so a cache hit reports what the first load did). Entries are written to
a temporary folder and renamed into place, so concurrent writers (several hosts on a shared
disk) never see half an entry. Truncation is not part of the key: it is cheap and applied after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

VERSION = 2  # 2: entries per shard, meta holds the source key


def cache_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts."""
    blob = json.dumps([VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def load(cache_dir: str, key: str):
    """(dataset, meta) of a cache entry, or None."""
    import datasets

    path = os.path.join(cache_dir, key)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return datasets.load_from_disk(os.path.join(path, "dataset")), meta


def save(cache_dir: str, key: str, dataset, meta: dict):
    """Stores an entry (if another writer got there first, keeps theirs) and returns it loaded."""
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)
    dataset.save_to_disk(os.path.join(tmp, "dataset"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    try:
        os.rename(tmp, os.path.join(cache_dir, key))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return load(cache_dir, key)
