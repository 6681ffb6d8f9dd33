"""The DPO loss family as pure functions of sequence log-probabilities.

Notation for one pair (x, y_w, y_l) with policy pi and reference pi_ref:
    r_w = log pi(y_w|x) - log pi_ref(y_w|x),  r_l = log pi(y_l|x) - log pi_ref(y_l|x)
    Delta = r_w - r_l  (reference-free: the reference terms are 0, Delta = gamma_policy)
Per-pair losses (definitions of TRL's DPOTrainer, trl 1.16):
    sigmoid : -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)
              (eps = label_smoothing; eps = 0 is DPO, eps > 0 is conservative DPO, cDPO)
    robust  : (-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)) / (1 - 2 eps)
    hinge   : max(0, 1 - beta Delta)                                  (SLiC)
    ipo     : (r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2         (length-normalised, |y| >= 1)
The batch loss is the mean over pairs, plus rpo_alpha times the negative log-likelihood of the
chosen completions averaged over their tokens (RPO; TRL's "sft" term).
Metrics (TRL's names, means over pairs): rewards/chosen = beta r_w, rewards/rejected = beta r_l,
rewards/accuracies = [r_w > r_l], rewards/margins = beta (r_w - r_l), logps/chosen = log pi(y_w|x),
logps/rejected = log pi(y_l|x).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    reference_free: bool = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"dpo.label_smoothing applies to the sigmoid and robust losses, not {self.loss_type!r}")


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs [pairs] and completion lengths [pairs] of a batch of pairs."""

    policy_chosen: jnp.ndarray
    policy_rejected: jnp.ndarray
    reference_chosen: jnp.ndarray
    reference_rejected: jnp.ndarray
    chosen_tokens: jnp.ndarray
    rejected_tokens: jnp.ndarray


def per_pair_loss(logps: PairLogps, settings: DPOSettings) -> jnp.ndarray:
    """The preference loss of each pair [pairs] (without the RPO term)."""
    beta, eps = settings.beta, settings.label_smoothing
    chosen_ratio, rejected_ratio = _log_ratios(logps, settings)
    delta = chosen_ratio - rejected_ratio
    if settings.loss_type == "sigmoid":
        return -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    if settings.loss_type == "robust":
        return (-(1 - eps) * jax.nn.log_sigmoid(beta * delta) + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    if settings.loss_type == "hinge":
        return jax.nn.relu(1 - beta * delta)
    normalised = chosen_ratio / jnp.maximum(logps.chosen_tokens, 1) - rejected_ratio / jnp.maximum(logps.rejected_tokens, 1)
    return (normalised - 1 / (2 * beta)) ** 2


def _log_ratios(logps: PairLogps, settings: DPOSettings) -> tuple[jnp.ndarray, jnp.ndarray]:
    if settings.reference_free:
        return logps.policy_chosen, logps.policy_rejected
    return logps.policy_chosen - logps.reference_chosen, logps.policy_rejected - logps.reference_rejected


def per_pair_metrics(logps: PairLogps, settings: DPOSettings) -> dict[str, jnp.ndarray]:
    """TRL's metrics for each pair (average them over pairs), reference terms stopped."""
    chosen_ratio, rejected_ratio = jax.tree_util.tree_map(jax.lax.stop_gradient, _log_ratios(logps, settings))
    chosen_reward, rejected_reward = settings.beta * chosen_ratio, settings.beta * rejected_ratio
    return {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": jax.lax.stop_gradient(logps.policy_chosen),
        "logps/rejected": jax.lax.stop_gradient(logps.policy_rejected),
    }


def batch_loss_sum(
    logps: PairLogps, weights: jnp.ndarray, settings: DPOSettings, num_pairs: jnp.ndarray, num_chosen_tokens: jnp.ndarray
) -> jnp.ndarray:
    """This (micro)batch's share of the full batch loss.

    ``weights`` [pairs] is 1 for real pairs and 0 for padding pairs; ``num_pairs`` and
    ``num_chosen_tokens`` are totals over the full batch, so the shares of all micro-batches
    add up to mean_pairs(loss) + rpo_alpha * NLL(chosen tokens).
    """
    total = jnp.sum(weights * per_pair_loss(logps, settings)) / num_pairs
    if settings.rpo_alpha:
        total = total - settings.rpo_alpha * jnp.sum(weights * logps.policy_chosen) / num_chosen_tokens
    return total
