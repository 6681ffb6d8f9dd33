"""Where the project's shared test data lives (tokenizers, preference and eval files; ../shared/README).

`$SDPO_JAX_SHARED_DATA` when set; else `shared/data` beside the repository (the project layout);
else `/work/shared/data` (so that a clone elsewhere, e.g. in a temporary folder, still finds it).
"""
from __future__ import annotations

import os
from pathlib import Path


def _locate() -> Path:
    if os.environ.get("SDPO_JAX_SHARED_DATA"):
        return Path(os.environ["SDPO_JAX_SHARED_DATA"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


SHARED_DATA = _locate()
