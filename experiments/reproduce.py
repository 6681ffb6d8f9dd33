"""Does the code at HEAD still produce the published numbers? Compare a rerun with committed results.

A seed's results are compared leaf by leaf (every number, count and name in ``results.json``),
except what is not a result: wall-clock times (``seconds``) and the provenance record. On the
platform the committed results were made on (same device kind, device count and numeric package
versions, see ``experiments.provenance``) a deterministic rerun agrees exactly, so every
difference is reported; elsewhere the differences are reported with their size, and it is the
reader's call whether they are within what another platform's arithmetic explains (`largest_final_change`
puts the largest change of a variant's final reward beside the seed-to-seed spread to help).
"""

from __future__ import annotations

import dataclasses
import math

from experiments.summary import final_reward

#: Keys of a result that are not results: they are left out of the comparison.
NOT_RESULTS = frozenset({"seconds", "wall_seconds_this_invocation", "provenance"})


@dataclasses.dataclass(frozen=True)
class Difference:
    path: str
    committed: object
    now: object

    def describe(self) -> str:
        if isinstance(self.committed, (int, float)) and isinstance(self.now, (int, float)):
            delta = self.now - self.committed
            relative = abs(delta) / abs(self.committed) if self.committed else math.inf
            return f"{self.path}: committed {self.committed!r}, now {self.now!r} (diff {delta:+.3g}, {relative:.2%})"
        return f"{self.path}: committed {self.committed!r}, now {self.now!r}"


def leaves(tree, prefix: str = "") -> dict[str, object]:
    """Every leaf of a JSON tree by its path (``variants.dpo.stages[0].reward``), without ``NOT_RESULTS``."""
    if isinstance(tree, dict):
        found = {}
        for key, value in tree.items():
            if key not in NOT_RESULTS:
                found.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return found
    if isinstance(tree, list):
        found = {}
        for i, value in enumerate(tree):
            found.update(leaves(value, f"{prefix}[{i}]"))
        return found
    return {prefix: tree}


def differences(committed: dict, now: dict) -> list[Difference]:
    """The leaves that differ (bit for bit: floats compared with ==), or exist on one side only."""
    before, after = leaves(committed), leaves(now)
    missing = object()
    found = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path, missing), after.get(path, missing)
        if a is missing or b is missing or (a != b and not _both_nan(a, b)):
            found.append(Difference(path, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
    return found


def _both_nan(a, b) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def largest_final_change(committed: dict, now: dict) -> tuple[float, str]:
    """max over variants v of |final reward_now(v) - final reward_committed(v)| for one seed's results, and
    that variant's name."""
    return max(
        (abs(final_reward(now, name) - final_reward(committed, name)), name)
        for name in committed["variants"]
        if name in now["variants"]
    )
