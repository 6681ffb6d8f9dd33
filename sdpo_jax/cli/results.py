"""How the scoring commands hand back their result: a JSON file, and the same object on stdout."""

from __future__ import annotations

import json


def write_result(path: str, metrics: dict) -> None:
    """Write ``metrics`` to ``path`` as indented JSON and print it as one line."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    print(json.dumps(metrics))
