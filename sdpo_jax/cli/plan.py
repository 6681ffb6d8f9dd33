"""sdpo-plan: check that a config fits a number of devices, without weights or accelerators.

usage: sdpo-plan --config PATH[:ARG] [--config.FIELD=VALUE ...] [--devices N] [--device_memory_gib G]
                 [--platform tpu|gpu|cpu] [--compile]

Checks the config as sdpo-train does (every field, the stages, the mesh and batch rules:
sdpo_jax.config_check), then reads only the model's config.json (`model.path` when it is a local folder, else
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
2 the config cannot run on that mesh at all (one line naming the field); 70 a bug in sdpo_jax (its
traceback, then a line saying so).
"""

from __future__ import annotations

import os
import subprocess
import sys

from absl import flags

_CHILD = "SDPO_PLAN_DEVICES"
DOES_NOT_FIT_EXIT_CODE = 1


def _define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_integer(
        "devices", None, "device count to plan for (default: config.hardware.devices)", flag_values=flag_values
    )
    flags.DEFINE_float(
        "device_memory_gib", None, "usable memory per device in GiB (default: config.hardware)", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "platform", None, ["tpu", "gpu", "cpu"], "target platform (default: config.hardware)", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "compile", False, "also compile the step for CPU and print XLA's memory figures", flag_values=flag_values
    )


def _reexec(devices: int, argv: list[str]) -> int:
    """Run this command again with ``devices`` fake CPU devices; returns its exit status."""
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = {
        **os.environ,
        _CHILD: str(devices),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*xla_flags, f"--xla_force_host_platform_device_count={devices}"]),
    }
    return subprocess.run([sys.executable, "-m", "sdpo_jax.cli.plan", *argv[1:]], env=env).returncode


def main(argv: list[str] | None = None) -> None:
    import configs.default
    from sdpo_jax.cli.config_args import parse_command_line, print_help, wants_help
    from sdpo_jax.cli.errors import USER_ERROR_EXIT_CODE, user_errors

    argv = list(sys.argv if argv is None else argv)
    if wants_help(argv):
        print_help(__doc__)
    with user_errors("sdpo-plan"):
        config, options = parse_command_line(argv, configs.default.__file__, _define_flags)
    hardware = config.get("hardware") or {}
    devices = options.devices or hardware.get("devices")
    if not devices or devices < 1:
        print("sdpo-plan: error: give --devices N (the config has no hardware.devices)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    if os.environ.get(_CHILD) != str(devices):
        sys.exit(_reexec(devices, argv))
    memory_gib = options.device_memory_gib or hardware.get("device_memory_gib")
    platform = options.platform or hardware.get("platform", "cpu")
    with user_errors("sdpo-plan"):
        fits = plan(config, devices, memory_gib, platform, options.compile)
    sys.exit(0 if fits else DOES_NOT_FIT_EXIT_CODE)


def plan(config, devices: int, memory_gib: float | None, platform: str, compile_step: bool) -> bool:
    """Print the plan of ``config`` on ``devices`` (this process's fake devices); True if it fits."""
    import jax
    import jax.numpy as jnp

    from sdpo_jax.checkpointing import abstract_with_shardings
    from sdpo_jax.config_check import check_config
    from sdpo_jax.memory_budget import GIB, KEPT_MODELS, compiled_memory, estimate
    from sdpo_jax.models.loading import build_module, model_shape
    from sdpo_jax.optim import make_optimizer
    from sdpo_jax.placement import state_shardings
    from sdpo_jax.sharding import MeshError, batch_sharding, planning_mesh
    from sdpo_jax.train_step import jit_train_step

    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} fake devices, JAX has {jax.device_count()}")
    checked = check_config(config, devices, local_files=False)  # every field, the stages, the mesh and batch rules
    config, first = checked.config, checked.stages[0]
    m = config.mesh
    dcn_data = m.dcn_data
    batch, accum = config.train.batch_size, config.train.grad_accum
    model_config, source = model_shape(config.model)
    try:
        mesh = planning_mesh(m.data, m.fsdp, m.tensor, dcn_data, jax.devices())
        model = build_module(config.model, model_config, mesh)
        optimizer = make_optimizer(first.optimizer(100))
        shardings, abstract = state_shardings(model, optimizer, mesh)
    except MeshError as err:
        raise MeshError(
            f"mesh data={m.data} fsdp={m.fsdp} tensor={m.tensor} dcn_data={dcn_data} on {devices} devices: {err}"
        ) from None
    budget = estimate(model_config, config, dict(mesh.shape), abstract, shardings, platform)

    precompute = config.train.precompute_reference
    step = jit_train_step(
        model,
        first.dpo,
        optimizer,
        mesh,
        shardings,
        with_reference_params=not precompute,
        grad_accum=config.train.grad_accum,
        chunk_size=config.model.logprob_chunk,
    )
    state = abstract_with_shardings(abstract, shardings)
    lowered = step.lower(
        state, None if precompute else state.params, _abstract_batch(config, batch_sharding(mesh), jnp)
    )

    memory = int(memory_gib * GIB) if memory_gib else None
    name = config.get("hardware", {}).get("name", f"{devices} devices")
    print(
        f"sdpo-plan: {model_config.architecture} {model_config.num_params / 1e9:.2f}B ({source}) on {name}: "
        f"{devices} devices, mesh {dict(mesh.shape)} (dcn_data {dcn_data}), {platform}"
    )
    print(
        f"batch {batch} pairs = {accum} micro-batch(es) of {batch // accum}; {config.model.dtype} compute, "
        f"remat {config.model.remat}, attention {config.model.attention}, logprob_chunk {config.model.logprob_chunk}, "
        f"reference {'precomputed' if precompute else 'in-step'}; train step traced and lowered"
    )
    print(budget.table(memory))
    needed, basis = budget.total, "estimate"
    if compile_step:
        xla = compiled_memory(lowered.compile())
        kept = budget.size(KEPT_MODELS)
        print(
            "XLA (CPU backend) per device: "
            + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in xla.items())
            + f"; with the {kept / GIB:.2f} GiB of models the driver keeps: {(xla['total'] + kept) / GIB:.2f} GiB"
        )
        if xla["total"] + kept > needed:
            needed, basis = xla["total"] + kept, "XLA's compiled step + kept models"
    if memory and needed > memory:
        item, size = budget.largest()
        print(
            f"sdpo-plan: does not fit: {needed / GIB:.1f} GiB per device ({basis}) > {memory / GIB:.1f} GiB "
            f"(largest estimated item: {item}, {size / GIB:.1f} GiB)",
            file=sys.stderr,
        )
        return False
    return True


def _abstract_batch(config, sharding, jnp) -> dict:
    """Shapes of one global batch at the longest bucket, as sdpo_jax.data batches and attach_reference make them."""
    import jax

    from sdpo_jax.memory_budget import longest_batch

    pairs = config.train.batch_size
    length = longest_batch(config)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    batch = {"pair_index": spec((pairs,), jnp.int32), "valid": spec((pairs,), jnp.bool_)}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = spec((pairs, length), jnp.int32)
        batch[f"{side}_attention_mask"] = spec((pairs, length), jnp.int32)
        batch[f"{side}_loss_mask"] = spec((pairs, length), jnp.bool_)
    if config.train.precompute_reference:
        batch["ref_chosen_logps"] = spec((pairs,), jnp.float32)
        batch["ref_rejected_logps"] = spec((pairs,), jnp.float32)
    return batch


if __name__ == "__main__":
    main()
