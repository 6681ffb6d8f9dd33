"""Orbax checkpoints of a run: mid-stage train states and end-of-stage snapshots.

Layout under ``output_dir/checkpoints``:
    stage_<t>/steps/<step>/{state, meta}   mid-stage: TrainState (params, optimizer state, step)
                                            plus JSON meta (stage, step, data iterator position)
    stage_<t>/final/0/{params, meta}        the aligned model M_t: the next stage's reference and
                                            policy start, and what sdpo-export writes out
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save (also during an async save) leaves only complete checkpoints behind. Saves are
collective across processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class RunCheckpoints:
    def __init__(self, output_dir: str | Path, keep: int = 2, async_save: bool = True):
        # Orbax wants absolute paths; a bucket path (gs://...) is absolute already.
        root = str(output_dir) if "://" in str(output_dir) else str(Path(output_dir).absolute())
        self.root = epath.Path(root) / "checkpoints"
        self.keep, self.async_save = keep, async_save
        self._managers: dict[tuple[int, str], ocp.CheckpointManager] = {}

    def _manager(self, stage: int, kind: str) -> ocp.CheckpointManager:
        key = (stage, kind)
        if key not in self._managers:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep if kind == "steps" else 1,
                enable_async_checkpointing=self.async_save and kind == "steps",
                create=True,
                # A step counts once its commit_success file exists, never by a folder rename: the
                # same on local disks, on gs:// and on a gcsfuse-mounted bucket (whose renames are
                # not atomic), so a preemption mid-save leaves no half checkpoint that looks whole.
                temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath,
            )
            self._managers[key] = ocp.CheckpointManager(self.root / f"stage_{stage}" / kind, options=options)
        return self._managers[key]

    def save_step(self, stage: int, step: int, state: Any, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager(stage, "steps").save(step, args=args)

    def latest_step(self, stage: int) -> int | None:
        if not (self.root / f"stage_{stage}" / "steps").is_dir():
            return None
        return self._manager(stage, "steps").latest_step()

    def restore_step(self, stage: int, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The mid-stage (TrainState, meta) of ``step``; a state of another layout is a one-line error."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager(stage, "steps").restore(step, args=args)
        except ValueError as err:
            if "tree structures do not match" not in str(err):
                raise
            where = " ".join(str(err).splitlines()[1:3]).strip()
            raise ValueError(f"stage {stage}: the checkpoint of step {step} in {self.root / f'stage_{stage}' / 'steps'} holds a "
                             f"train state of another layout ({where}; written by another sdpo_jax version or other "
                             f"optimizer settings): use another output_dir, or delete that folder to restart the stage") from None
        return restored.state, restored.meta

    def save_stage(self, stage: int, params: Any, meta: dict) -> None:
        """The end-of-stage snapshot, written synchronously (the next stage needs it)."""
        self.wait()
        manager = self._manager(stage, "final")
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    def finished_stages(self) -> list[int]:
        stages = []
        for folder in sorted(self.root.glob("stage_*/final")):
            stage = int(folder.parent.name.split("_")[1])
            if self._manager(stage, "final").latest_step() is not None:
                stages.append(stage)
        return sorted(stages)

    def load_stage(self, stage: int, abstract_params: Any) -> tuple[Any, dict]:
        """The stage's params laid out as ``abstract_params`` says; leaves without a sharding go to
        this host's first device (e.g. exporting a run trained on another mesh or machine)."""
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree_util.tree_map(
            lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
            abstract_params)
        manager = self._manager(stage, "final")
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{self.root}: stage {stage} has no finished snapshot")
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        restored = manager.restore(0, args=args)
        return restored.params, restored.meta

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()
