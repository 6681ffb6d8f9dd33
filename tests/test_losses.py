"""The DPO losses against independent NumPy formulas (TRL 1.16's definitions; cDPO as TRL < 1.0 had it),
and DPOSettings: its normalisation, its construction from the config's dpo section, its refusals."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from sdpo_jax.errors import ConfigError
from sdpo_jax.losses import DPOSettings, PairLogps, batch_loss_sum, per_pair_loss, per_pair_metrics


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def _numpy_loss(pc, pr, rc, rr, lc, lr, beta, loss_type, eps):
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsigmoid(beta * delta) - eps * _logsigmoid(-beta * delta)
    if loss_type == "robust":
        return (-(1 - eps) * _logsigmoid(beta * delta) + eps * _logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * delta)
    return ((pc - rc) / np.maximum(lc, 1) - (pr - rr) / np.maximum(lr, 1) - 1 / (2 * beta)) ** 2


def _random_logps(seed=0, pairs=16):
    rng = np.random.default_rng(seed)
    values = [-rng.uniform(5, 80, pairs) for _ in range(4)]
    lengths = [rng.integers(1, 40, pairs).astype(np.float64) for _ in range(2)]
    return values + lengths


@pytest.mark.parametrize(
    "loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_numpy(loss_type, eps, beta):
    arrays = _random_logps()
    settings = DPOSettings(beta=beta, loss_type=loss_type, label_smoothing=eps)
    got = per_pair_loss(PairLogps(*map(jnp.asarray, arrays)), settings, loss_type)
    np.testing.assert_allclose(got, _numpy_loss(*arrays, beta, loss_type, eps), rtol=1e-6, atol=1e-6)


def test_metrics_and_reference_free():
    pc, pr, rc, rr, lc, lr = _random_logps(1)
    logps = PairLogps(*map(jnp.asarray, (pc, pr, rc, rr, lc, lr)))
    m = per_pair_metrics(logps, DPOSettings(beta=0.2))
    np.testing.assert_allclose(m["rewards/chosen"], 0.2 * (pc - rc), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], 0.2 * (pr - rr), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], 0.2 * ((pc - rc) - (pr - rr)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m["rewards/accuracies"], ((pc - rc) > (pr - rr)).astype(np.float32))
    np.testing.assert_allclose(m["logps/chosen"], pc, rtol=1e-6)
    free = per_pair_loss(logps, DPOSettings(beta=0.2, reference_free=True), "sigmoid")
    np.testing.assert_allclose(free, -_logsigmoid(0.2 * (pc - pr)), rtol=1e-6)


def test_batch_loss_with_padding_and_rpo():
    pc, pr, rc, rr, lc, lr = _random_logps(2, pairs=6)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
    settings = DPOSettings(beta=0.1, rpo_alpha=0.5)
    got = batch_loss_sum(
        PairLogps(*map(jnp.asarray, (pc, pr, rc, rr, lc, lr))),
        jnp.asarray(weights),
        settings,
        jnp.asarray(4.0),
        jnp.asarray(lc[:4].sum()),
    )
    real = slice(0, 4)
    expected = _numpy_loss(pc[real], pr[real], rc[real], rr[real], lc[real], lr[real], 0.1, "sigmoid", 0.0).mean()
    expected += 0.5 * -pc[real].sum() / lc[real].sum()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_discopop_stays_finite_where_exp_of_the_margin_overflows():
    """z = -200: e^-z overflows float32, but its factor sig(z/tau) is e^-4000; the loss is -log sig(z) = 200."""
    logps = PairLogps(*map(jnp.asarray, ([-2000.0], [0.0], [0.0], [0.0], [5.0], [5.0])))
    loss = per_pair_loss(logps, DPOSettings(loss_type="discopop"), "discopop")
    np.testing.assert_allclose(loss, [200.0], rtol=1e-6)


def test_settings_normalise_to_one_hashable_value():
    """A name, a comma list, a tuple or a list mean the same loss; no weights means weight 1 each."""
    forms = [
        DPOSettings(loss_type="sigmoid,bco_pair, sft"),
        DPOSettings(loss_type=("sigmoid", "bco_pair", "sft")),
        DPOSettings(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights="1,1,1"),
        DPOSettings(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(1, 1.0, 1)),
    ]
    assert all(form == forms[0] and hash(form) == hash(forms[0]) for form in forms)
    assert forms[0].loss_type == ("sigmoid", "bco_pair", "sft") and forms[0].loss_weights == (1.0, 1.0, 1.0)
    assert DPOSettings().loss_type == ("sigmoid",) and DPOSettings(beta=1).beta == 1.0
    assert DPOSettings(loss_type="aot").couples_pairs and not DPOSettings(loss_type="sigmoid,sft").couples_pairs


def test_config_section_builds_settings_by_name():
    """``DPOSettings(**config.dpo)``: a dpo section holding every field by name, as ml_collections holds
    them (strings for the lists, so that command-line and per-stage overrides stay strings)."""
    defaults = {field.name: field.default for field in dataclasses.fields(DPOSettings)}
    section = ml_collections.ConfigDict({**defaults, "loss_weights": ""})
    assert DPOSettings(**section) == DPOSettings()
    section.loss_type, section.loss_weights, section.use_weighting = "sigmoid,bco_pair,nca_pair", "0.8,0.2,1.0", True
    assert DPOSettings(**section).loss_weights == (0.8, 0.2, 1.0)
    DPOSettings(**get_config().dpo)  # today's section, whatever subset of the fields it holds


@pytest.mark.parametrize(
    "field, bad",
    [
        ("loss_type", dict(loss_type="kto")),
        ("loss_type", dict(loss_type=())),
        ("loss_type", dict(loss_type=("sigmoid", 3))),
        ("loss_weights", dict(loss_weights=(1.0, 2.0))),
        ("loss_weights", dict(loss_type="sigmoid,sft", loss_weights="a,b")),
        ("loss_weights", dict(loss_weights=(-1.0,))),
        ("beta", dict(beta=0.0)),
        ("beta", dict(beta="0.1")),
        ("beta", dict(beta=float("nan"))),
        ("label_smoothing", dict(label_smoothing=0.5)),
        ("label_smoothing", dict(loss_type="hinge", label_smoothing=0.1)),
        ("label_smoothing", dict(loss_type="exo_pair")),
        ("rpo_alpha", dict(rpo_alpha=-1.0)),
        ("reference_free", dict(reference_free="False")),
        ("f_divergence_type", dict(f_divergence_type="kl")),
        ("f_divergence_type", dict(f_divergence_type="js_divergence", loss_type="bco_pair")),
        ("f_divergence_type", dict(f_divergence_type="forward_kl", loss_type=("sigmoid", "aot"))),
        ("f_alpha_divergence_coef", dict(f_alpha_divergence_coef=0.3)),
        ("use_weighting", dict(use_weighting=True, loss_type="aot")),
        ("use_weighting", dict(use_weighting=True, loss_type="sigmoid,sft")),
        ("use_weighting", dict(use_weighting=1)),
        ("ld_alpha", dict(ld_alpha=1.5)),
        ("ld_alpha", dict(ld_alpha=-0.1)),
        ("discopop_tau", dict(loss_type="discopop", discopop_tau=0.0)),
        ("discopop_tau", dict(discopop_tau=0.1)),
    ],
)
def test_bad_settings_are_refused_naming_the_field(field, bad):
    with pytest.raises(ConfigError, match=f"^dpo\\.{field}"):
        DPOSettings(**bad)


def test_f_divergence_message_names_the_losses():
    with pytest.raises(
        ConfigError, match="dpo.f_divergence_type 'js_divergence' applies only to .*'sigmoid'.*not \\('bco_pair',\\)"
    ):
        DPOSettings(loss_type="sigmoid,bco_pair", f_divergence_type="js_divergence")
