"""The preference-loss family of TRL 1.16's DPOTrainer, as pure functions of sequence log-probs.

Notation for one pair (x, y_w, y_l), policy pi, reference pi_ref, sig the logistic function:
    u_w = log pi(y_w|x) - log pi_ref(y_w|x),  u_l likewise      (reference_free: pi_ref terms are 0)
    s = f'(e^u), the f-divergence score of a log-ratio (f_divergence_type; f-DPO, arXiv 2309.16240):
        reverse_kl s = u;  forward_kl s = 1 - e^-u;  js_divergence s = log 2 + log sig(u);
        alpha_divergence s = (e^((a-1) u) - 1) / (a-1), (a-1) u capped at 80, a = f_alpha_divergence_coef
        (|a - 1| < 1e-6: s = u)
    z = beta (s_w - s_l),  m = s_w/|y_w| - s_l/|y_l| (|y| completion tokens, at least 1),  eps = label_smoothing
Per-pair losses (loss_type):
    sigmoid      -(1-eps) log sig(z) - eps log sig(-z)              DPO 2305.18290 (eps > 0: cDPO, Mitchell 2023)
    hinge        max(0, 1 - z)                                       SLiC 2305.10425
    ipo          (m - 1/(2 beta))^2                                  IPO 2310.12036 (per-token, as TRL)
    exo_pair     sig(z) log(sig(z)/(1-eps)) + sig(-z) log(sig(-z)/eps)          EXO 2402.00856 (eps > 0)
    nca_pair     -log sig(beta u_w) - log sig(-beta u_w)/2 - log sig(-beta u_l)/2   NCA 2402.05369
    robust       (-(1-eps) log sig(z) + eps log sig(-z)) / (1 - 2 eps)          rDPO 2403.00409
    bco_pair     -log sig(beta u_w) - log sig(-beta u_l)            BCO 2404.04656 (TRL 1.16: no running reward mean)
    sppo_hard    (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2         SPPO 2405.00675 (hard labels)
    apo_zero     sig(-beta u_w) + sig(beta u_l)                      APO 2408.06266 eq. 7
    apo_down     sig(beta u_w) + sig(-beta (u_w - u_l))              APO 2408.06266 eq. 8
    discopop     sig(-z/tau) (-log sig(z)) + sig(z/tau) e^-z,  tau = discopop_tau   DiscoPOP 2406.08414 eq. 5
                 (computed so that it stays finite where TRL's e^-z overflows to nan)
    sigmoid_norm -log sig(beta m)                                    DPO on per-token log-ratios
Batch losses, over the batch's valid pairs j = 1..B, l(t) = -(1-eps) log sig(t) - eps log sig(-t):
    aot          1/B sum_j l(beta (sort_j(log pi_w - log pi_l) - sort_j(log pi_ref_w - log pi_ref_l)))   AOT 2406.05882
    aot_unpaired 1/B sum_j l(beta (sort_j(u_w) - sort_j(u_l)))                                           AOT 2406.05882
    sft          -(sum of the chosen tokens' log-probs) / (number of chosen tokens)     MPO 2411.10442's SFT term
The loss is sum_k loss_weights[k] * (mean over pairs of loss_type[k]; the batch losses as above) plus
rpo_alpha * sft (RPO 2404.19733; our own field, never WPO-weighted). MPO is ("sigmoid", "bco_pair", "sft").
The chosen NLL is computed once, weighted by rpo_alpha plus the loss_weights of sft.
WPO (use_weighting, 2406.11827): each pair's loss is multiplied by w = w_w w_l, w_y = exp(mean over y's tokens
of log(p_t / sum_v p_v^2)) under the policy, without gradient (not with aot, aot_unpaired, sft: TRL 1.16 refuses
the first two and fails on the third).
LD-DPO (ld_alpha = a, 2409.06411): every sequence log-prob, policy and reference, is the sum over the first
min(|y_w|, |y_l|) completion tokens plus a times the sum over the rest; a = 1 is off (TRL's None). The sft
term keeps the plain sums.

"The batch" of aot, aot_unpaired and sft is the full optimizer batch: all pairs of the step, over every
device of the mesh and every gradient-accumulation micro-batch (sdpo_jax.train_step), padding pairs left
out. That is TRL's batch on one device without accumulation; TRL sorts and averages tokens within each
device's micro-batch instead. Held-out evaluation takes the whole pair set as one batch.

Metrics (TRL's names, means over pairs): rewards/chosen = beta u_w, rewards/rejected = beta u_l,
rewards/accuracies = [u_w > u_l], rewards/margins = beta (u_w - u_l), logps/chosen = log pi(y_w|x),
logps/rejected = log pi(y_l|x) (LD-weighted with ld_alpha, as TRL's), plus loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdpo_jax.errors import ConfigError

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Only these are built on s_w - s_l, where f-DPO's log Z(x) cancels (TRL refuses the others).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # the ones that read label_smoothing
SORTED_LOSSES = ("aot", "aot_unpaired")
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
_ALPHA_CAP = 80.0  # TRL's float32 cap on (a-1) u before exp


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The preference loss; each field has the meaning and default of TRL 1.16's DPOConfig field of
    the same name, except: ``loss_type``/``loss_weights`` also take a comma-separated string, and
    ``loss_weights`` () means all 1.0 (TRL: None); ``ld_alpha`` 1.0 means off (TRL: None, which
    weighs every token 1.0 too); ``label_smoothing`` > 0 also turns sigmoid into cDPO (TRL 1.16
    ignores it there); ``rpo_alpha`` and ``reference_free`` are ours. Values are normalised (tuples,
    floats), so settings that mean the same compare and hash the same (a jit cache key)."""

    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: str | tuple[float, ...] = ()
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    ld_alpha: float = 1.0
    discopop_tau: float = 0.05

    def __post_init__(self):
        names = _names(self.loss_type)
        object.__setattr__(self, "loss_type", names)
        object.__setattr__(self, "loss_weights", _loss_weights(self.loss_weights, len(names)))
        for field in ("beta", "label_smoothing", "rpo_alpha", "f_alpha_divergence_coef", "ld_alpha", "discopop_tau"):
            object.__setattr__(self, field, _number(field, getattr(self, field)))
        for field in ("reference_free", "use_weighting"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"dpo.{field} must be True or False, got {getattr(self, field)!r}")
        _check_ranges(self)
        _check_combinations(self)

    @property
    def couples_pairs(self) -> bool:
        """Whether a micro-batch's gradient needs the other micro-batches' log-probs (aot and
        aot_unpaired sort the whole batch)."""
        return any(name in SORTED_LOSSES for name in self.loss_type)

    @property
    def ld_weighting(self) -> bool:
        """Whether LD-DPO reweighs the tokens beyond the shared completion length."""
        return self.ld_alpha != 1.0


def _names(loss_type) -> tuple[str, ...]:
    names = loss_type.split(",") if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"dpo.loss_type must be a name, a comma list or a tuple of names, got {loss_type!r}")
    names = tuple(n.strip() for n in names)
    if not names or any(n not in LOSS_TYPES for n in names):
        raise ConfigError(f"dpo.loss_type {loss_type!r}: each name must be one of {LOSS_TYPES}")
    return names


def _loss_weights(weights, count: int) -> tuple[float, ...]:
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = (weights,)
    if isinstance(weights, str):
        try:
            weights = tuple(float(w) for w in weights.split(",") if w.strip())
        except ValueError:
            raise ConfigError(f"dpo.loss_weights {weights!r} is not a comma list of numbers") from None
    if not isinstance(weights, (tuple, list)):
        raise ConfigError(f"dpo.loss_weights must be a tuple of numbers, got {weights!r}")
    weights = tuple(_number("loss_weights", w) for w in weights) or (1.0,) * count
    if len(weights) != count:
        raise ConfigError(f"dpo.loss_weights has {len(weights)} weights for {count} loss types")
    if any(w < 0 for w in weights):
        raise ConfigError(f"dpo.loss_weights must not be negative, got {weights}")
    return weights


def _number(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"dpo.{field} must be a finite number, got {value!r}")
    return float(value)


def _check_ranges(s: DPOSettings) -> None:
    if s.beta <= 0:
        raise ConfigError(f"dpo.beta must be positive, got {s.beta}")
    if not 0.0 <= s.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must lie in [0, 0.5), got {s.label_smoothing}")
    if s.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha must not be negative, got {s.rpo_alpha}")
    if s.f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(f"dpo.f_divergence_type {s.f_divergence_type!r} is not one of {F_DIVERGENCES}")
    if not 0.0 <= s.ld_alpha <= 1.0:
        raise ConfigError(f"dpo.ld_alpha must lie in [0, 1] (1 = off), got {s.ld_alpha}")
    if s.discopop_tau <= 0:
        raise ConfigError(f"dpo.discopop_tau must be positive, got {s.discopop_tau}")


def _check_combinations(s: DPOSettings) -> None:
    """Each non-default parameter must apply to some chosen loss type (TRL's rules, plus: a
    parameter no chosen loss reads is an error rather than silently ignored)."""
    names = set(s.loss_type)
    if s.label_smoothing and not names & set(SMOOTHED_LOSSES):
        raise ConfigError(f"dpo.label_smoothing applies only to {SMOOTHED_LOSSES}, not {s.loss_type}")
    if "exo_pair" in names and not s.label_smoothing:
        raise ConfigError("dpo.label_smoothing must be positive with exo_pair (EXO's epsilon; the paper uses 1e-3)")
    if s.f_divergence_type != "reverse_kl" and not names <= set(F_DIVERGENCE_LOSSES):
        raise ConfigError(
            f"dpo.f_divergence_type {s.f_divergence_type!r} applies only to {F_DIVERGENCE_LOSSES}, "
            f"not {tuple(sorted(names - set(F_DIVERGENCE_LOSSES)))}"
        )
    if s.f_alpha_divergence_coef != 0.5 and s.f_divergence_type != "alpha_divergence":
        raise ConfigError(
            "dpo.f_alpha_divergence_coef applies only to f_divergence_type 'alpha_divergence', "
            f"not {s.f_divergence_type!r}"
        )
    if s.use_weighting and names & {*SORTED_LOSSES, "sft"}:
        raise ConfigError(
            f"dpo.use_weighting does not apply to {(*SORTED_LOSSES, 'sft')}: aot and aot_unpaired sort, so no "
            "weight belongs to a pair, and TRL 1.16 fails on sft with it"
        )
    if s.discopop_tau != 0.05 and "discopop" not in names:
        raise ConfigError(f"dpo.discopop_tau applies only to loss_type 'discopop', not {s.loss_type}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Per-pair inputs of the loss, each [pairs]: sequence log-probs (LD-weighted with ld_alpha),
    completion token counts and, only when a setting needs them, ``policy_chosen_plain`` (the chosen
    sum without LD weighting, for sft) and ``log_weight`` (WPO's log w, no gradient)."""

    policy_chosen: jnp.ndarray
    policy_rejected: jnp.ndarray
    reference_chosen: jnp.ndarray
    reference_rejected: jnp.ndarray
    chosen_tokens: jnp.ndarray
    rejected_tokens: jnp.ndarray
    policy_chosen_plain: jnp.ndarray | None = None
    log_weight: jnp.ndarray | None = None


class _Pair(NamedTuple):
    """What the per-pair losses read: log-ratios u, f-divergence scores s, token counts (at least 1)."""

    chosen_ratio: jnp.ndarray
    rejected_ratio: jnp.ndarray
    chosen_score: jnp.ndarray
    rejected_score: jnp.ndarray
    chosen_tokens: jnp.ndarray
    rejected_tokens: jnp.ndarray


def _references(logps: PairLogps, settings: DPOSettings) -> tuple[jnp.ndarray, jnp.ndarray]:
    if settings.reference_free:
        return jnp.zeros_like(logps.policy_chosen), jnp.zeros_like(logps.policy_rejected)
    return logps.reference_chosen, logps.reference_rejected


def _log_ratios(logps: PairLogps, settings: DPOSettings) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(u_w, u_l) = policy minus reference sequence log-probs."""
    ref_chosen, ref_rejected = _references(logps, settings)
    return logps.policy_chosen - ref_chosen, logps.policy_rejected - ref_rejected


def f_divergence_score(log_ratio: jnp.ndarray, settings: DPOSettings) -> jnp.ndarray:
    """s = f'(e^u) of the chosen f-divergence (formulas in the module docstring)."""
    kind, a = settings.f_divergence_type, settings.f_alpha_divergence_coef
    if kind == "forward_kl":
        return -jnp.expm1(-log_ratio)
    if kind == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(log_ratio)
    if kind == "alpha_divergence" and abs(a - 1.0) >= 1e-6:
        return jnp.expm1(jnp.minimum((a - 1.0) * log_ratio, _ALPHA_CAP)) / (a - 1.0)
    return log_ratio


def _pair_terms(logps: PairLogps, settings: DPOSettings) -> _Pair:
    chosen, rejected = _log_ratios(logps, settings)
    return _Pair(
        chosen,
        rejected,
        f_divergence_score(chosen, settings),
        f_divergence_score(rejected, settings),
        jnp.maximum(logps.chosen_tokens, 1.0),
        jnp.maximum(logps.rejected_tokens, 1.0),
    )


def _smoothed_logistic(t: jnp.ndarray, eps: float) -> jnp.ndarray:
    """-(1-eps) log sig(t) - eps log sig(-t)."""
    return -(1 - eps) * jax.nn.log_sigmoid(t) - eps * jax.nn.log_sigmoid(-t)


def _z(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return s.beta * (p.chosen_score - p.rejected_score)


def _per_token_margin(p: _Pair) -> jnp.ndarray:
    return p.chosen_score / p.chosen_tokens - p.rejected_score / p.rejected_tokens


def _sigmoid(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return _smoothed_logistic(_z(p, s), s.label_smoothing)


def _hinge(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return jax.nn.relu(1 - _z(p, s))


def _ipo(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return (_per_token_margin(p) - 1 / (2 * s.beta)) ** 2


def _exo_pair(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    """KL(Bernoulli(sig(z)) || Bernoulli(1 - eps))."""
    z, eps = _z(p, s), s.label_smoothing
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - math.log(eps)
    )


def _nca_pair(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    chosen, rejected = s.beta * p.chosen_ratio, s.beta * p.rejected_ratio
    return -jax.nn.log_sigmoid(chosen) - 0.5 * jax.nn.log_sigmoid(-chosen) - 0.5 * jax.nn.log_sigmoid(-rejected)


def _robust(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    z, eps = _z(p, s), s.label_smoothing
    return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return -jax.nn.log_sigmoid(s.beta * p.chosen_ratio) - jax.nn.log_sigmoid(-s.beta * p.rejected_ratio)


def _sppo_hard(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return (p.chosen_ratio - 0.5 / s.beta) ** 2 + (p.rejected_ratio + 0.5 / s.beta) ** 2


def _apo_zero(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return jax.nn.sigmoid(-s.beta * p.chosen_ratio) + jax.nn.sigmoid(s.beta * p.rejected_ratio)


def _apo_down(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return jax.nn.sigmoid(s.beta * p.chosen_ratio) + jax.nn.sigmoid(-s.beta * (p.chosen_ratio - p.rejected_ratio))


def _discopop(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    """sig(-z/tau) (-log sig(z)) + sig(z/tau) e^-z, the second term as exp(log sig(z/tau) - z) so that
    it stays finite for very negative z."""
    z = _z(p, s)
    return jax.nn.sigmoid(-z / s.discopop_tau) * -jax.nn.log_sigmoid(z) + jnp.exp(
        jax.nn.log_sigmoid(z / s.discopop_tau) - z
    )


def _sigmoid_norm(p: _Pair, s: DPOSettings) -> jnp.ndarray:
    return -jax.nn.log_sigmoid(s.beta * _per_token_margin(p))


_PAIR_LOSSES: dict[str, Callable[[_Pair, DPOSettings], jnp.ndarray]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
}


def per_pair_loss(logps: PairLogps, settings: DPOSettings, loss_type: str) -> jnp.ndarray:
    """One per-pair loss type's loss of each pair [pairs] (no WPO weight)."""
    return _PAIR_LOSSES[loss_type](_pair_terms(logps, settings), settings)


def _ascending(values: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """The valid entries of ``values`` in ascending order, then 0 for each invalid one."""
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
    return jnp.where(jnp.arange(values.shape[0]) < jnp.sum(valid), ordered, 0.0)


def _sorted_loss(logps: PairLogps, valid: jnp.ndarray, settings: DPOSettings, loss_type: str) -> jnp.ndarray:
    """aot / aot_unpaired: l(beta (sorted margin j)) for j < the number of valid pairs, then 0 [pairs].

    Padding pairs (``valid`` 0) take no part in the sort. Over a sharded batch XLA sorts the global
    array, so any mesh gives the single-device result.
    """
    valid = valid > 0
    if loss_type == "aot":
        ref_chosen, ref_rejected = _references(logps, settings)
        upper, lower = logps.policy_chosen - logps.policy_rejected, ref_chosen - ref_rejected
    else:
        upper, lower = _log_ratios(logps, settings)
    margin = _ascending(upper, valid) - _ascending(lower, valid)
    in_use = jnp.arange(margin.shape[0]) < jnp.sum(valid)
    return jnp.where(in_use, _smoothed_logistic(settings.beta * margin, settings.label_smoothing), 0.0)


def _wpo_weights(logps: PairLogps, settings: DPOSettings) -> jnp.ndarray | float:
    """WPO's pair weights w [pairs] (no gradient), or 1.0 without use_weighting."""
    if not settings.use_weighting:
        return 1.0
    return jnp.exp(jax.lax.stop_gradient(logps.log_weight))


def _chosen_nll_sum(logps: PairLogps, valid: jnp.ndarray) -> jnp.ndarray:
    """-sum over valid pairs of the chosen completions' log-probs (without LD weighting)."""
    plain = logps.policy_chosen if logps.policy_chosen_plain is None else logps.policy_chosen_plain
    return -jnp.sum(valid * plain)


def batch_loss_sum(
    logps: PairLogps, valid: jnp.ndarray, settings: DPOSettings, num_pairs: jnp.ndarray, num_chosen_tokens: jnp.ndarray
) -> jnp.ndarray:
    """This (micro)batch's share of the full batch's loss (module docstring).

    ``valid`` [pairs] is 1 for real pairs and 0 for padding pairs; ``num_pairs`` and
    ``num_chosen_tokens`` (at least 1) count the full batch's valid pairs and their chosen tokens,
    so the shares of all micro-batches add up to the full batch's loss as long as
    ``settings.couples_pairs`` is false. Otherwise ``logps`` must hold the whole batch.
    """
    weighted = valid * _wpo_weights(logps, settings)
    total = 0.0
    for loss_type, loss_weight in zip(settings.loss_type, settings.loss_weights):
        if loss_type == "sft":
            continue
        if loss_type in SORTED_LOSSES:
            term = jnp.sum(_sorted_loss(logps, valid, settings, loss_type)) / num_pairs
        else:
            term = jnp.sum(weighted * per_pair_loss(logps, settings, loss_type)) / num_pairs
        total = total + loss_weight * term
    nll_weight = _chosen_nll_weight(settings)
    if nll_weight:
        total = total + nll_weight * _chosen_nll_sum(logps, valid) / num_chosen_tokens
    return total


def _chosen_nll_weight(settings: DPOSettings) -> float:
    """The weight of the chosen tokens' mean NLL in the loss: rpo_alpha plus the loss_weights of "sft"."""
    return settings.rpo_alpha + sum(w for name, w in zip(settings.loss_type, settings.loss_weights) if name == "sft")


def metric_sums(
    logps: PairLogps, weights: jnp.ndarray, settings: DPOSettings, loss: jnp.ndarray
) -> dict[str, jnp.ndarray]:
    """Per-pair metrics summed over the pairs with ``weights`` [pairs] (1 real, 0 padding), their count
    ``num_pairs``, and ``loss``: this batch's share of the loss (``batch_loss_sum``), without gradient."""
    sums = {name: jnp.sum(weights * value) for name, value in per_pair_metrics(logps, settings).items()}
    sums["loss"] = jax.lax.stop_gradient(loss)
    sums["num_pairs"] = jnp.sum(weights)
    return sums


def metric_means(sums: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """TRL's means from ``metric_sums`` (added over micro-batches): the sums divided by ``num_pairs``;
    ``loss`` is already the whole loss; ``num_pairs`` stays a count."""
    count = jnp.maximum(sums["num_pairs"], 1.0)
    means = {name: value / count for name, value in sums.items() if name not in ("loss", "num_pairs")}
    means["loss"] = sums["loss"]
    means["num_pairs"] = sums["num_pairs"]
    return means


def per_pair_metrics(logps: PairLogps, settings: DPOSettings) -> dict[str, jnp.ndarray]:
    """TRL's metrics for each pair (average them over pairs), without gradient."""
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
