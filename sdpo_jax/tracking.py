"""Experiment trackers that mirror metrics.jsonl: TensorBoard event files, and W&B when asked.

Each metric row ``{"split", "stage", "step", name: value, ...}`` becomes scalars tagged
``{split}/{name}`` (rows measured before/after a stage: ``{split}_{when}/{name}``) at the run-wide step, which counts
optimizer steps across stages (stage t's step s is the steps of stages 1..t-1 plus s), so the
stages of one run read as one curve (a stage's 'before' eval shares its step with the previous
stage's last step).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from sdpo_jax.errors import ConfigError

_ROW_KEYS = ("split", "when", "stage", "step")


def scalars(row: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """(tag prefix, numeric metrics) of one metrics.jsonl row."""
    prefix = f"{row['split']}_{row['when']}" if "when" in row else row["split"]
    values = {k: float(v) for k, v in row.items() if k not in _ROW_KEYS and isinstance(v, (int, float))}
    return prefix, values


class TensorBoardSink:
    """Event files under ``folder`` (tensorboard --logdir folder)."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(folder), flush_secs=30)

    def write(self, row: dict[str, Any], global_step: int) -> None:
        prefix, values = scalars(row)
        with self._abandoned_on_error():
            for name, value in values.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, global_step)
            self._writer.add_scalar(f"{prefix}/stage", row["stage"], global_step)
            self._writer.flush()

    def text(self, tag: str, markdown: str, global_step: int) -> None:
        with self._abandoned_on_error():
            self._writer.add_text(tag, markdown, global_step)
            self._writer.flush()

    def close(self) -> None:
        with self._abandoned_on_error():
            self._writer.close()

    @contextlib.contextmanager
    def _abandoned_on_error(self):
        """A failed write (a full disk) is raised once: the writer is then dropped with its unwritten
        events, so that tensorboardX's exit hook does not try, fail and print the error again."""
        try:
            yield
        except OSError:
            for writer in (self._writer.all_writers or {}).values():
                writer.event_writer._closed = True  # tensorboardX has no public way to drop pending events
            raise


class WandbSink:
    """A Weights & Biases run (``wandb`` must be installed; offline mode works without network)."""

    def __init__(self, project: str, name: str, config: dict, folder: Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError("log.wandb=True needs the wandb package (pip install wandb)") from None
        self._run = wandb.init(project=project, name=name, config=config, dir=str(folder), resume="allow")

    def write(self, row: dict[str, Any], global_step: int) -> None:
        prefix, values = scalars(row)
        self._run.log({f"{prefix}/{k}": v for k, v in values.items()} | {"stage": row["stage"]}, step=global_step)

    def text(self, tag: str, markdown: str, global_step: int) -> None:
        self._run.log({tag: markdown}, step=global_step)

    def close(self) -> None:
        self._run.finish()
