"""docs/config.md lists exactly the fields of configs/default.py, with exactly their defaults."""

from __future__ import annotations

import re
from pathlib import Path

from configs.default import get_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
ROW = re.compile(r"^\| `([a-z_.]+)` \| `(.*)` \| .+ \|$")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_every_field_is_documented_with_its_default():
    documented = {m.group(1): m.group(2) for m in map(ROW.match, DOC.read_text(encoding="utf-8").splitlines()) if m}
    fields = _flat(get_config().to_dict())
    assert sorted(set(fields) - set(documented)) == [], "fields missing from docs/config.md"
    assert sorted(set(documented) - set(fields)) == [], "docs/config.md lists fields the code does not have"
    wrong = {k: (documented[k], repr(v)) for k, v in fields.items() if documented[k] != repr(v)}
    assert wrong == {}, "defaults in docs/config.md differ from configs/default.py"
