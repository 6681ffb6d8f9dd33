"""The optimizer: AdamW with warmup then linear or cosine decay, global-norm clipping.

Learning rate at step t (T total steps, W warmup steps, peak lr, floor = min_lr_ratio * lr):
    t < W : lr * t / W
    else  : floor + (lr - floor) * s(p),  p = (t - W) / (T - W),
            s = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine), 1 (constant)
Weight decay applies to matrices (kernels, embeddings), never to norm scales or biases.
"""
from __future__ import annotations

import dataclasses
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
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), total >= 1")


def learning_rate_schedule(s: OptimizerSettings) -> optax.Schedule:
    floor = s.min_lr_ratio * s.learning_rate
    decay_steps = max(s.total_steps - s.warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = s.learning_rate * step / max(s.warmup_steps, 1)
        progress = jnp.clip((step - s.warmup_steps) / decay_steps, 0.0, 1.0)
        shape = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + jnp.cos(math.pi * progress)), "constant": 1.0}[s.schedule]
        decayed = floor + (s.learning_rate - floor) * shape
        return jnp.where(step < s.warmup_steps, warm, decayed)

    return schedule


def weight_decay_mask(params):
    """True for kernels and embedding tables, False for norm scales and biases."""

    def decays(path, _):
        name = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)][-1]
        return name.endswith("_kernel") or name in ("embed_tokens", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(s), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay, mask=weight_decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), adamw) if s.max_grad_norm else adamw
