"""sdpo-train: run stepwise DPO from an ml_collections config."""

from __future__ import annotations

import sys

from absl import flags

HELP = """
usage: sdpo-train [--config PATH[:ARG]] [--config.SECTION.FIELD=VALUE ...] [--show_config]
                  [--coordinator HOST:PORT --num_processes N --process_id I]

Stepwise DPO (sDPO, arXiv 2403.19270): the preference data split into sdpo.num_stages chunks,
easiest first; stage t trains the policy from M(t-1) against M(t-1) as its frozen reference.
With no --config it runs the embedded default (configs/default.py: SmolLM2-135M-Instruct on the
shipped preference samples, 2 stages, CPU, a few minutes) and writes under ./runs/default.

options:
  --config PATH[:ARG]        an ml_collections config file with get_config(ARG); e.g.
                             configs/tiny.py (a one-minute smoke run on a tiny random model) or
                             configs/llama3_8b_instruct_sdpo.py:v4-32
  --config.FIELD=VALUE       override one field, e.g. --config.train.batch_size=8,
                             --config.model.path=/ckpt/my-sft, --config.sdpo.num_stages=3,
                             --config.data.train="('a.jsonl','b.jsonl')",
                             --config.sdpo.stage_overrides="('2:dpo.beta=0.2',)"
  --show_config              check the config, print every field with its value, and exit
  --coordinator HOST:PORT    multi-host: process 0's address (with --num_processes, --process_id);
                             not needed on Cloud TPU or under SLURM
  -h, --help                 this text

Every config field, its default and meaning: docs/config.md in the repository, or
`sdpo-train [--config PATH] --show_config`. The config is checked before anything is loaded or
written; a bad value is one line naming the field, exit status 2.

Run the same command again after a crash, SIGKILL or SIGTERM (which saves and exits 143): it
resumes where the run stopped and ends with the same parameters. Outputs in output_dir:
config.json, metrics.jsonl, partition.json, stage_report.json, report.md, plots/, tensorboard/,
checkpoints/ (Orbax). Exit status: 0 done, 2 bad input or environment, 143 preempted, 70 a bug in
sdpo_jax (its traceback, then a line saying so: please report it).
"""


def _define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "coordinator", None, "HOST:PORT of process 0 for explicit multi-host runs", flag_values=flag_values
    )
    flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-host)", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "this process's index (explicit multi-host)", flag_values=flag_values)
    flags.DEFINE_bool("show_config", False, "check the config, print every field and exit", flag_values=flag_values)


def _start_distributed(jax, options: flags.FlagValues) -> None:
    """Join the other processes: at --coordinator when given; under SLURM with several tasks, where
    `jax.distributed.initialize()` reads everything from SLURM's environment. (A Cloud TPU pod's
    hosts find each other through the TPU runtime.)"""
    import os

    from sdpo_jax.errors import SdpoError

    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    if not options.coordinator and not slurm:
        return
    try:
        if options.coordinator:
            jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id)
        else:
            jax.distributed.initialize()
    except Exception as err:  # noqa: BLE001 (an unreachable coordinator, a bad process id: told in one line)
        where = f"at {options.coordinator}" if options.coordinator else "(SLURM)"
        raise SdpoError(f"could not join the other processes {where}: {' '.join(str(err).split())[:300]}") from None


def main(argv: list[str] | None = None) -> None:
    import configs.default
    from sdpo_jax.cli.config_args import parse_command_line, print_help, wants_help
    from sdpo_jax.cli.errors import user_errors

    argv = list(sys.argv if argv is None else argv)
    if wants_help(argv):
        print_help(HELP)
    with user_errors("sdpo-train"):
        config, options = parse_command_line(argv, configs.default.__file__, _define_flags)
        from sdpo_jax.host_memory import apply_host_allocator

        # Before JAX starts its backend (a bad value is refused by check_config below, having done nothing).
        apply_host_allocator(config.get("train", {}).get("host_allocator", "system"))
        import jax
        from absl import logging

        # Orbax logs every save at INFO and a failed save also at ERROR, with tracebacks from its
        # background threads; the failure itself reaches the user as the command's one-line error.
        logging.set_verbosity(logging.FATAL)
        _start_distributed(jax, options)
        from sdpo_jax.config_check import check_config, describe_fields

        checked = check_config(config, jax.device_count())
        if options.show_config:
            print("\n".join(describe_fields(checked.config)))
            print("config OK", file=sys.stderr)
            return
        from sdpo_jax.stages import PREEMPTED_EXIT_CODE, Preempted, train

        try:
            train(checked)
        except Preempted:
            sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
