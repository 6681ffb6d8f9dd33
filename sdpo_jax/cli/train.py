"""sdpo-train: run stepwise DPO from an ml_collections config.

    sdpo-train [--config PATH] [--config.FIELD=VALUE ...]

With no --config it runs the embedded default (configs/default.py). Started again with the same
command after a crash, SIGKILL or SIGTERM, it resumes where the run stopped. Multi-host:
on Cloud TPU and under SLURM `jax.distributed.initialize()` finds its peers; elsewhere pass
--coordinator HOST:PORT --num_processes N --process_id I.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs.default

_CONFIG = config_flags.DEFINE_config_file("config", configs.default.__file__, "ml_collections config file")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 for explicit multi-host runs")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-host)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (explicit multi-host)")


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from sdpo_jax.cli.errors import user_errors
    from sdpo_jax.stages import PREEMPTED_EXIT_CODE, Preempted, train

    with user_errors("sdpo-train"):
        try:
            train(_CONFIG.value)
        except Preempted:
            sys.exit(PREEMPTED_EXIT_CODE)


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
