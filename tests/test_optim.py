"""The optimizer: AdamW on the warmup/decay schedule, whose numbers are state, not compiled code."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdpo_jax.optim import OptimizerSettings, make_optimizer, weight_decay_mask

PARAMS = {
    "embed_tokens": jnp.ones((6, 4)),
    "layers": {
        "mlp": {"up_proj_kernel": jnp.full((4, 5), 0.5, jnp.float32)},
        "input_layernorm": {"scale": jnp.ones(4)},
    },
}


def _grads(seed: int):
    keys = iter(jax.random.split(jax.random.key(seed), 3))
    return jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape), PARAMS)


def _on_device(tree):
    """Committed to one device, as the train loop's placed state is (the jit cache tells the two apart)."""
    return jax.device_put(tree, jax.devices()[0])


def _reference(s: OptimizerSettings) -> optax.GradientTransformation:
    """The same optimizer written out with Python numbers baked in (module docstring of sdpo_jax.optim)."""
    floor = s.min_lr_ratio * s.learning_rate

    def lr(t):
        if t < s.warmup_steps:
            return s.learning_rate * t / s.warmup_steps
        p = min(max((t - s.warmup_steps) / max(s.total_steps - s.warmup_steps, 1), 0.0), 1.0)
        shape = {"linear": 1 - p, "cosine": 0.5 * (1 + np.cos(np.pi * p)), "constant": 1.0}[s.schedule]
        return floor + (s.learning_rate - floor) * shape

    table = jnp.asarray([lr(t) for t in range(s.total_steps + 2)], jnp.float32)
    adamw = optax.adamw(
        lambda t: table[t], b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay, mask=weight_decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), adamw)


@pytest.mark.parametrize(
    "settings",
    [
        OptimizerSettings(learning_rate=1e-2, total_steps=6, warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5),
        OptimizerSettings(learning_rate=3e-3, total_steps=5, schedule="cosine", min_lr_ratio=0.1, max_grad_norm=10.0),
    ],
)
def test_updates_follow_the_schedule(settings):
    ours, reference = make_optimizer(settings), _reference(settings)
    state_a, state_b, params_a, params_b = ours.init(PARAMS), reference.init(PARAMS), PARAMS, PARAMS
    for t in range(settings.total_steps + 1):
        updates_a, state_a = ours.update(_grads(t), state_a, params_a)
        updates_b, state_b = reference.update(_grads(t), state_b, params_b)
        params_a, params_b = optax.apply_updates(params_a, updates_a), optax.apply_updates(params_b, updates_b)
        for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {t}")


def test_stages_with_other_numbers_share_one_compiled_step():
    first = OptimizerSettings(learning_rate=1e-2, total_steps=10, warmup_steps=2)
    second = OptimizerSettings(learning_rate=4e-3, total_steps=37, warmup_steps=0, min_lr_ratio=0.2)
    assert first.compiled() == second.compiled()
    optimizer = make_optimizer(first)
    step = jax.jit(
        lambda state, grads: optimizer.update(grads, state, PARAMS)
    )  # compiled with the first stage's optimizer
    step(_on_device(optimizer.init(PARAMS)), _on_device(_grads(0)))
    own = make_optimizer(second)
    state = _on_device(own.init(PARAMS))
    for t in range(3):  # the second stage's state through the first stage's compiled step: its own schedule
        (updates, state), (expected, _) = step(state, _on_device(_grads(t))), own.update(_grads(t), state, PARAMS)
        for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5)  # (compiled vs op-by-op rounding)
    assert step._cache_size() == 1
