"""sdpo-plan: check that a config fits a number of devices, without weights or accelerators.

    sdpo-plan --config PATH[:ARG] [--config.FIELD=VALUE ...] [--devices N] [--device_memory_gib G]
              [--platform tpu|gpu|cpu] [--compile]

Reads only the model's config.json (`model.path` when it is a local folder, else
`model.shape_config`), lays the config's mesh over N fake CPU devices (the command runs itself
again in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N, which must be set
before JAX starts), checks that every sharded dimension splits (batch over dcn_data*data*fsdp,
heads, kv heads, MLP and vocabulary over tensor, hidden over fsdp), traces the sharded train step
on abstract inputs (eval_shape of the state, `jit(...).lower`), and prints the per-device memory
budget of sdpo_jax.memory_budget. With --compile it also compiles the step for the CPU backend and
prints XLA's own per-device figures (CPU: float32 where the target computes in bfloat16 and the
XLA attention path where a TPU/GPU would use a fused kernel, so an upper bound, not the target's).

N, G and the platform default to the config's `hardware` section (the real-model configs have one).
The fit is judged on the estimate, or with --compile on the larger of the estimate and XLA's
figure plus the models the stage driver keeps on the devices.
Exit status: 0 fits; 1 does not fit (one line on stderr: how much over, and the largest item);
2 the config cannot run on that mesh at all (one line naming the field).
"""
from __future__ import annotations

import os
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

import configs.default

_CONFIG = config_flags.DEFINE_config_file("config", configs.default.__file__, "ml_collections config file")
_DEVICES = flags.DEFINE_integer("devices", None, "device count to plan for (default: config.hardware.devices)")
_MEMORY = flags.DEFINE_float("device_memory_gib", None, "usable memory per device in GiB (default: config.hardware)")
_PLATFORM = flags.DEFINE_enum("platform", None, ["tpu", "gpu", "cpu"], "target platform (default: config.hardware)")
_COMPILE = flags.DEFINE_bool("compile", False, "also compile the step for CPU and print XLA's memory figures")
_CHILD = "SDPO_PLAN_DEVICES"
DOES_NOT_FIT_EXIT_CODE = 1


def _hardware(field: str, default=None):
    hardware = _CONFIG.value.get("hardware")
    return hardware.get(field, default) if hardware is not None else default


def _reexec(devices: int) -> int:
    """Run this command again with ``devices`` fake CPU devices; returns its exit status."""
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = {**os.environ, _CHILD: str(devices), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": " ".join([*xla_flags, f"--xla_force_host_platform_device_count={devices}"])}
    return subprocess.run([sys.executable, "-m", "sdpo_jax.cli.plan", *sys.argv[1:]], env=env).returncode


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from sdpo_jax.cli.errors import USER_ERROR_EXIT_CODE, user_errors

    devices = _DEVICES.value or _hardware("devices")
    if not devices or devices < 1:
        print("sdpo-plan: error: give --devices N (the config has no hardware.devices)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    if os.environ.get(_CHILD) != str(devices):
        sys.exit(_reexec(devices))
    memory_gib = _MEMORY.value or _hardware("device_memory_gib")
    platform = _PLATFORM.value or _hardware("platform", "cpu")
    with user_errors("sdpo-plan"):
        fits = plan(_CONFIG.value, devices, memory_gib, platform, _COMPILE.value)
    sys.exit(0 if fits else DOES_NOT_FIT_EXIT_CODE)


def plan(config, devices: int, memory_gib: float | None, platform: str, compile_step: bool) -> bool:
    """Print the plan of ``config`` on ``devices`` (this process's fake devices); True if it fits."""
    import jax
    import jax.numpy as jnp

    from sdpo_jax.checkpointing import abstract_with_shardings
    from sdpo_jax.losses import DPOSettings
    from sdpo_jax.memory_budget import GIB, KEPT_MODELS, compiled_memory, estimate
    from sdpo_jax.models.loading import build_module, model_shape
    from sdpo_jax.optim import OptimizerSettings, make_optimizer
    from sdpo_jax.sharded_steps import jit_train_step, state_shardings
    from sdpo_jax.sharding import MeshError, batch_sharding, planning_mesh
    from sdpo_jax.train_step import make_train_step

    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} fake devices, JAX has {jax.device_count()}")
    m = config.mesh
    dcn_data = m.get("dcn_data", 1)
    model_config, source = model_shape(config.model)
    try:
        mesh = planning_mesh(m.data, m.fsdp, m.tensor, dcn_data, jax.devices())
        model = build_module(config.model, model_config, mesh)
        replicas = mesh.shape["data"] * mesh.shape["fsdp"]
        batch, accum = config.train.batch_size, config.train.grad_accum
        if batch % accum or (batch // accum) % replicas:
            raise MeshError(f"train.batch_size={batch} / train.grad_accum={accum} = {batch / accum:g} pairs per micro-batch "
                            f"do not split over dcn_data*data*fsdp = {replicas} devices")
        checks = config.get("eval")
        if checks is not None and checks.get("choices") and checks.choices_batch_size % replicas:
            raise MeshError(f"eval.choices_batch_size={checks.choices_batch_size} questions do not split over "
                            f"dcn_data*data*fsdp = {replicas} devices")
        optimizer = make_optimizer(OptimizerSettings(learning_rate=config.train.learning_rate, total_steps=100,
                                                     weight_decay=config.train.weight_decay))
        shardings, abstract = state_shardings(model, optimizer, mesh)
    except MeshError as err:
        raise MeshError(f"mesh data={m.data} fsdp={m.fsdp} tensor={m.tensor} dcn_data={dcn_data} on {devices} devices: "
                        f"{err}") from None
    budget = estimate(model_config, config, dict(mesh.shape), abstract, shardings, platform)

    precompute = config.train.precompute_reference
    step = jit_train_step(make_train_step(model, DPOSettings(beta=config.dpo.beta, loss_type=config.dpo.loss_type), optimizer,
                                          config.train.grad_accum, config.model.logprob_chunk),
                          mesh, shardings, with_reference_params=not precompute)
    state = abstract_with_shardings(abstract, shardings)
    lowered = step.lower(state, None if precompute else state.params, _abstract_batch(config, batch_sharding(mesh), jnp))

    memory = int(memory_gib * GIB) if memory_gib else None
    name = config.get("hardware", {}).get("name", f"{devices} devices")
    print(f"sdpo-plan: {model_config.architecture} {model_config.num_params / 1e9:.2f}B ({source}) on {name}: "
          f"{devices} devices, mesh {dict(mesh.shape)} (dcn_data {dcn_data}), {platform}")
    print(f"batch {batch} pairs = {accum} micro-batch(es) of {batch // accum}; {config.model.dtype} compute, "
          f"remat {config.model.remat}, attention {config.model.attention}, logprob_chunk {config.model.logprob_chunk}, "
          f"reference {'precomputed' if precompute else 'in-step'}; train step traced and lowered")
    print(budget.table(memory))
    needed, basis = budget.total, "estimate"
    if compile_step:
        xla = compiled_memory(lowered.compile())
        kept = budget.size(KEPT_MODELS)
        print("XLA (CPU backend) per device: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in xla.items())
              + f"; with the {kept / GIB:.2f} GiB of models the driver keeps: {(xla['total'] + kept) / GIB:.2f} GiB")
        if xla["total"] + kept > needed:
            needed, basis = xla["total"] + kept, "XLA's compiled step + kept models"
    if memory and needed > memory:
        item, size = budget.largest()
        print(f"sdpo-plan: does not fit: {needed / GIB:.1f} GiB per device ({basis}) > {memory / GIB:.1f} GiB "
              f"(largest estimated item: {item}, {size / GIB:.1f} GiB)", file=sys.stderr)
        return False
    return True


def _abstract_batch(config, sharding, jnp) -> dict:
    """Shapes of one global batch at the longest bucket, as sdpo_jax.data batches and attach_reference make them."""
    import jax

    from sdpo_jax.memory_budget import longest_batch

    pairs = config.train.batch_size
    length = longest_batch(config)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    batch = {"pair_index": spec((pairs,), jnp.int32), "valid": spec((pairs,), jnp.bool_)}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = spec((pairs, length), jnp.int32)
        batch[f"{side}_attention_mask"] = spec((pairs, length), jnp.int32)
        batch[f"{side}_loss_mask"] = spec((pairs, length), jnp.bool_)
    if config.train.precompute_reference:
        batch["ref_chosen_logps"] = spec((pairs,), jnp.float32)
        batch["ref_rejected_logps"] = spec((pairs,), jnp.float32)
    return batch


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
