"""The DPO loss family against independent NumPy formulas (TRL 1.16's definitions)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_numpy(loss_type, eps, beta):
    arrays = _random_logps()
    settings = DPOSettings(beta=beta, loss_type=loss_type, label_smoothing=eps)
    got = per_pair_loss(PairLogps(*map(jnp.asarray, arrays)), settings)
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
    free = per_pair_loss(logps, DPOSettings(beta=0.2, reference_free=True))
    np.testing.assert_allclose(free, -_logsigmoid(0.2 * (pc - pr)), rtol=1e-6)


def test_batch_loss_with_padding_and_rpo():
    pc, pr, rc, rr, lc, lr = _random_logps(2, pairs=6)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
    settings = DPOSettings(beta=0.1, rpo_alpha=0.5)
    got = batch_loss_sum(PairLogps(*map(jnp.asarray, (pc, pr, rc, rr, lc, lr))), jnp.asarray(weights), settings,
                         jnp.asarray(4.0), jnp.asarray(lc[:4].sum()))
    real = slice(0, 4)
    expected = _numpy_loss(pc[real], pr[real], rc[real], rr[real], lc[real], lr[real], 0.1, "sigmoid", 0.0).mean()
    expected += 0.5 * -pc[real].sum() / lc[real].sum()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(loss_type="kto"), dict(beta=0.0), dict(label_smoothing=0.5), dict(loss_type="hinge", label_smoothing=0.1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="dpo\\."):
        DPOSettings(**bad)
