"""The optimizer: AdamW with warmup then linear or cosine decay, global-norm clipping.

Learning rate at step t (T total steps, W warmup steps, peak lr, floor = min_lr_ratio * lr):
    t < W : lr * t / W
    else  : floor + (lr - floor) * s(p),  p = (t - W) / (T - W),
            s = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine), 1 (constant)
Weight decay applies to matrices (kernels, embeddings), never to norm scales or biases.

The schedule's numbers (lr, floor, W, T) are not compiled into the train step: they are state
(`optax.inject_hyperparams`), set when a stage's TrainState is created. So every sDPO stage,
whatever its step count or learning rate, runs the same compiled step; what is compiled in is
`OptimizerSettings.compiled()` (the schedule's shape, Adam's b1/b2/eps, weight decay, clipping).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float = 5e-7
    total_steps: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.lr_schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), total >= 1"
            )

    def compiled(self) -> tuple:
        """The settings a compiled train step depends on (the schedule's numbers are state)."""
        return (self.schedule, self.b1, self.b2, self.eps, self.weight_decay, self.max_grad_norm)

    def schedule_numbers(self) -> dict[str, float]:
        """The schedule's numbers, as `optax.inject_hyperparams` keeps them in the optimizer state."""
        return {
            "peak": self.learning_rate,
            "floor": self.min_lr_ratio * self.learning_rate,
            "warmup_steps": float(self.warmup_steps),
            "total_steps": float(self.total_steps),
        }


def scheduled_lr(step, shape: str, peak, floor, warmup_steps, total_steps):
    """The learning rate at ``step`` (module docstring); the numbers may be traced arrays."""
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / jnp.maximum(warmup_steps, 1.0)
    progress = jnp.clip((step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1.0), 0.0, 1.0)
    fraction = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + jnp.cos(math.pi * progress)), "constant": 1.0}[shape]
    return jnp.where(step < warmup_steps, warm, floor + (peak - floor) * fraction)


def weight_decay_mask(params):
    """True for kernels and embedding tables, False for norm scales and biases."""

    def decays(path, _):
        name = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)][-1]
        return name.endswith("_kernel") or name in ("embed_tokens", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    """Clipping then AdamW on the schedule of ``s``, whose numbers start as the optimizer state's."""

    def scheduled_adamw(peak, floor, warmup_steps, total_steps):
        schedule = functools.partial(
            scheduled_lr, shape=s.schedule, peak=peak, floor=floor, warmup_steps=warmup_steps, total_steps=total_steps
        )
        return optax.adamw(schedule, b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay, mask=weight_decay_mask)

    adamw = optax.inject_hyperparams(scheduled_adamw, hyperparam_dtype=jnp.float32)(**s.schedule_numbers())
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), adamw) if s.max_grad_norm else adamw
