"""Catching a diverged stage: a non-finite loss or gradient norm stops it; a loss that climbs far
above where the stage started is reported once.

The train loop hands each step's metrics to `LossWatch.observe`. Reading them from the device
waits for that step, so the loop passes step t's metrics while step t+1 is already queued (one
step late, the host never stalls the devices) and once more, at once, before anything is saved.
A stage that diverged is never saved: `TrainingDiverged` leaves the last good checkpoint behind.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sdpo_jax.errors import TrainingDiverged

RISE_FACTOR = 10.0  # warn when loss - first loss > RISE_FACTOR * max(|first loss|, RISE_FLOOR)
RISE_FLOOR = 0.1


class LossWatch:
    """Watches one stage's (loss, grad_norm) per step; ``warn`` prints one console line."""

    def __init__(self, stage: int, advice: str, warn: Callable[[str], None]):
        self.stage, self.advice, self.warn = stage, advice, warn
        self.first_loss: float | None = None
        self.warned = False
        self.pending: tuple[int, Any] | None = None  # (step, device metrics) not looked at yet

    def defer(self, step: int, metrics: dict) -> None:
        """Look at the step before this one (finished or nearly), then keep this one for later."""
        self.flush()
        self.pending = (step, {k: metrics[k] for k in ("loss", "grad_norm")})

    def flush(self) -> None:
        """Look at the kept step now (waits for it)."""
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            self.observe(step, {k: float(v) for k, v in jax.device_get(metrics).items()})

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """`TrainingDiverged` at a non-finite loss or gradient norm; one warning when the loss climbs."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingDiverged(f"stage {self.stage} step {step}: the loss is {loss} and the gradient norm {norm}: "
                                   f"training diverged ({self.advice}); the stage was not saved as finished")
        if self.first_loss is None:
            self.first_loss = loss
        elif not self.warned and loss - self.first_loss > RISE_FACTOR * max(abs(self.first_loss), RISE_FLOOR):
            self.warned = True
            self.warn(f"warning: stage {self.stage} step {step}: loss {loss:.4g} is far above its first value "
                      f"{self.first_loss:.4g}; training may be diverging ({self.advice})")


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
