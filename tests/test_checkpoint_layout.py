"""A mid-stage checkpoint whose train state has another layout is refused with one line, not Orbax's tree dump."""

import jax
import jax.numpy as jnp
import optax
import pytest

from sdpo_jax.checkpointing import RunCheckpoints
from sdpo_jax.errors import SdpoError
from sdpo_jax.optim import OptimizerSettings, make_optimizer
from sdpo_jax.train_step import TrainState

PARAMS = {"q_kernel": jnp.ones((3, 4)), "norm": {"scale": jnp.ones(4)}}


def test_checkpoint_of_another_train_state_layout_is_a_one_line_error(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    older = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3)
    )  # the optimizer state before its schedule became state
    checkpoints.save_step(1, 2, TrainState.create(PARAMS, older), {"step": 2})
    checkpoints.wait()
    now = TrainState.create(PARAMS, make_optimizer(OptimizerSettings()))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), now)
    with pytest.raises(SdpoError) as refused:
        checkpoints.restore_latest(1, abstract)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"stage 1: the checkpoint of step 2 in {tmp_path}")
    assert "holds a train state of another layout" in message and "use another output_dir" in message
    step, same, meta, _ = checkpoints.restore_latest(
        1,
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), TrainState.create(PARAMS, older)
        ),
    )
    assert (step, int(same.step), meta) == (2, 0, {"step": 2})  # (a layout mismatch is not damage: nothing set aside)
    checkpoints.close()
