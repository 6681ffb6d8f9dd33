"""Catching a diverged stage: a non-finite loss or gradient norm stops it; a loss that climbs far above where
the stage started is reported once.

The train loop hands every step's metrics to `LossWatch.track`, which folds them on the devices into
the first step whose loss or gradient norm is not finite (no host sync: the devices run ahead as
before). `LossWatch.check` reads that record where the loop syncs anyway, at logged steps, before
every checkpoint and at the end, so nothing non-finite is ever saved; `observe` looks at a logged
row. A stage that diverged is never saved: `TrainingDiverged` leaves the last good checkpoint behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sdpo_jax.errors import TrainingDiverged

RISE_FACTOR = 10.0  # warn when loss - first loss > RISE_FACTOR * max(|first loss|, RISE_FLOOR)
RISE_FLOOR = 0.1


@jax.jit
def _fold(record: tuple, step, loss, norm) -> tuple:
    """(step, loss, grad norm) of the first step with a non-finite loss or norm so far (step -1: none)."""
    take = (record[0] < 0) & ~(jnp.isfinite(loss) & jnp.isfinite(norm))
    return tuple(jnp.where(take, new, old) for new, old in zip((jnp.int32(step), loss, norm), record))


class LossWatch:
    """Watches one stage's (loss, grad_norm); ``warn`` prints one console line; ``first_loss`` is the stage's
    first logged loss when the stage is resumed (the baseline of the climb warning)."""

    def __init__(self, stage: int, advice: str, warn: Callable[[str], None], first_loss: float | None = None):
        self.stage, self.advice, self.warn = stage, advice, warn
        self.first_loss = first_loss
        self.warned = False
        self.record: tuple | None = None  # on the devices: see _fold

    def track(self, step: int, metrics: dict) -> None:
        """Fold step ``step``'s loss and gradient norm into the device-side record (asynchronous)."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        if self.record is None:
            self.record = (jnp.int32(-1), jnp.zeros_like(loss), jnp.zeros_like(norm))
        self.record = _fold(self.record, step, loss, norm)

    def check(self) -> None:
        """`TrainingDiverged` when a tracked step was not finite (waits for the devices)."""
        if self.record is not None:
            step, loss, norm = (v.item() for v in jax.device_get(self.record))
            if step >= 0:
                self._diverged(step, loss, norm)

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """A logged row: `TrainingDiverged` when not finite; one warning when the loss has climbed far."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._diverged(step, loss, norm)
        if self.first_loss is None:
            self.first_loss = loss
        elif not self.warned and loss - self.first_loss > RISE_FACTOR * max(abs(self.first_loss), RISE_FLOOR):
            self.warned = True
            self.warn(
                f"warning: stage {self.stage} step {step}: loss {loss:.4g} is far above its first value "
                f"{self.first_loss:.4g}; training may be diverging ({self.advice})"
            )

    def _diverged(self, step: int, loss: float, norm: float) -> None:
        raise TrainingDiverged(
            f"stage {self.stage} step {step}: the loss is {loss} and the gradient norm {norm}: "
            f"training diverged ({self.advice}); the stage was not saved as finished"
        )


@jax.jit
def all_finite(tree: Any) -> jnp.ndarray:
    """True when every floating-point element of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def first_non_finite(tree: Any) -> str | None:
    """The path of the first leaf holding a NaN or infinity, else None (reads only when something is)."""
    if bool(all_finite(tree)):
        return None
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
            return jax.tree_util.keystr(path)
    return None
