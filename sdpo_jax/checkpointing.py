"""Orbax checkpoints of a run: mid-stage train states and end-of-stage snapshots.

Layout under ``output_dir/checkpoints``:
    stage_<t>/steps/<step>/{state, meta}   mid-stage: TrainState (params, optimizer state, step)
                                            plus JSON meta (stage, step, data iterator position)
    stage_<t>/final/0/{params, meta}        the aligned model M_t: the next stage's reference and
                                            policy start, and what sdpo-export writes out
    stage_<t>/corrupt/<step>/               a mid-stage checkpoint found unreadable on resume, set aside
    pruned_stages.json                      finished stages whose snapshot was removed (checkpoint.keep_stages)
Orbax writes each checkpoint to a temporary directory and marks it complete at the end, so a run
killed mid-save (also during an async save) leaves only complete checkpoints behind. Saves are
collective across processes. Once a stage's snapshot is saved its mid-stage checkpoints are removed.

Integrity: Orbax reads back flipped bits without complaint, so every checkpoint's meta holds a
checksum of each array, computed on the devices from the arrays being saved (`tree_checksums`),
and every restore compares it with the restored arrays'. Resume falls back from an unreadable or
altered mid-stage checkpoint to the previous one (else to the stage's start) with a warning; an
altered stage snapshot is a one-line `CorruptCheckpoint` naming its folder.
"""

from __future__ import annotations

import errno
import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sdpo_jax.errors import CorruptCheckpoint, SdpoError
from sdpo_jax.host_exchange import allgather_json, any_process, on_main_process


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _bits(x: jnp.ndarray) -> jnp.ndarray:
    """The raw bits of every element of ``x`` as uint32, in ``x``'s own shape (narrower types widened; an
    8-byte type gets a trailing axis of its two 32-bit halves)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _odd_position_weights(shape: tuple[int, ...]) -> jnp.ndarray:
    """2 i + 1 (mod 2^32) for each element's row-major position i, built from per-axis indices, so that an
    array split over devices is weighed where it lies (no device gathers the whole array)."""
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return position * jnp.uint32(2) + jnp.uint32(1)


@jax.jit
def _checksums(tree: Any) -> jnp.ndarray:
    sums = []
    for leaf in jax.tree_util.tree_leaves(tree):
        bits = _bits(jnp.asarray(leaf))
        sums.append(jnp.sum(bits * _odd_position_weights(bits.shape), dtype=jnp.uint32))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def tree_checksums(tree: Any) -> list[int]:
    """Per leaf, sum_i bits(x_i) * (2i + 1) mod 2^32 over its elements in order.

    Integer arithmetic, so the same for any device layout or reduction order; a single flipped bit
    changes its leaf's sum (2^k times an odd number is never 0 mod 2^32), and so does moving values
    between positions.
    """
    return [int(v) for v in np.asarray(jax.device_get(_checksums(tree)))]


def _verify(tree: Any, expected: list[int] | None, what: str) -> None:
    if expected is None:  # written before checksums existed
        return
    actual = tree_checksums(tree)
    if actual != list(expected):
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        bad = next((paths[i] for i, (a, b) in enumerate(zip(actual, expected)) if a != b), "the leaf count")
        raise CorruptCheckpoint(f"{what}: its contents differ from what was saved (checksum of {bad})")


class RunCheckpoints:
    def __init__(
        self,
        output_dir: str | Path,
        keep: int = 2,
        async_save: bool = True,
        keep_stages: int = 0,
        warn: Callable[[str], None] = print,
    ):
        # Orbax wants absolute paths; a bucket path (gs://...) is absolute already.
        root = str(output_dir) if "://" in str(output_dir) else str(Path(output_dir).absolute())
        self.root = epath.Path(root) / "checkpoints"
        self.keep, self.async_save, self.keep_stages, self.warn = keep, async_save, keep_stages, warn
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

    def _drop_manager(self, stage: int, kind: str) -> None:
        manager = self._managers.pop((stage, kind), None)
        if manager is not None:
            manager.wait_until_finished()
            manager.close()

    def _ensure_space(self, tree: Any, what: str) -> None:
        """`OSError` (one line) when the disk lacks room for the part of ``tree`` this process writes, decided on
        every process alike, before anything is written: a save that runs out of space midway fails in
        background threads."""
        needed = int(sum(_bytes_written_here(x) for x in jax.tree_util.tree_leaves(tree)) * 1.05)
        folder = Path(str(self.root))
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if any_process(free < needed):
            raise OSError(
                errno.ENOSPC,
                f"no space left for {what}: it needs ~{needed / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB are free on {folder}",
            )

    def save_step(self, stage: int, step: int, state: Any, meta: dict, reference: Any = None) -> None:
        """A mid-stage checkpoint: the train state, the JSON ``meta`` and (a moving reference) ``reference``."""
        self.wait()  # (an earlier save's data is on disk before the free space is counted)
        self._ensure_space((state, reference), f"the checkpoint of stage {stage} step {step}")
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({**meta, "checksums": tree_checksums((state, reference))}),
        }
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        self._manager(stage, "steps").save(step, args=ocp.args.Composite(**items))

    def latest_step(self, stage: int) -> int | None:
        if not (self.root / f"stage_{stage}" / "steps").is_dir():
            return None
        return self._manager(stage, "steps").latest_step()

    def restore_latest(
        self, stage: int, abstract_state: Any, abstract_reference: Any = None
    ) -> tuple[int, Any, dict, Any] | None:
        """(step, TrainState, meta, moving reference or None) of the newest intact mid-stage checkpoint of
        ``stage``, or None; ``abstract_reference`` when the stage's reference moves (it is saved with the state).

        A checkpoint that some process cannot decode, or whose arrays differ from their checksums, is set
        aside (stage_<t>/corrupt/<step>) on every process alike with a warning, and the one before it is
        tried. A state of another layout (another version's) is a one-line error; so is a failure of the
        machine (memory, permissions, I/O), which says nothing about the checkpoint.
        """
        while (step := self.latest_step(stage)) is not None:
            restored, problem = None, None
            try:
                restored = self.restore_step(stage, step, abstract_state, abstract_reference)
            except (CorruptCheckpoint, _UnreadableCheckpoint) as err:
                problem = str(err)
            problems = [p for p in allgather_json(problem) if p]
            if not problems:
                return (step, *restored)
            self._drop_manager(stage, "steps")
            damaged, target = (self.root / f"stage_{stage}" / kind / str(step) for kind in ("steps", "corrupt"))
            on_main_process(
                functools.partial(_move, damaged, target),
                f"set aside the damaged checkpoint {target.parent.parent / 'steps' / str(step)}",
            )
            older = self.latest_step(stage)
            self.warn(
                f"warning: {problems[0]}; moved it to {target.parent}, resuming from "
                + (f"step {older}" if older is not None else f"the start of stage {stage}")
            )
        return None

    def restore_step(
        self, stage: int, step: int, abstract_state: Any, abstract_reference: Any = None
    ) -> tuple[Any, dict, Any]:
        """(TrainState, meta, moving reference or None) of one mid-stage checkpoint, checked against its checksums."""
        folder = self.root / f"stage_{stage}" / "steps" / str(step)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if abstract_reference is not None:
            items["reference"] = ocp.args.StandardRestore(abstract_reference)
        try:
            restored = self._manager(stage, "steps").restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 (tensorstore and JSON decoding raise many types for damaged files)
            if "tree structures do not match" in str(err):
                where = " ".join(str(err).splitlines()[1:3]).strip()
                raise SdpoError(
                    f"stage {stage}: the checkpoint of step {step} in {folder.parent} holds a "
                    f"train state of another layout ({where}; written by another sdpo_jax version or other "
                    "optimizer settings): use another output_dir, or delete that folder to restart the stage"
                ) from None
            if _machine_problem(err):
                raise
            raise _UnreadableCheckpoint(
                f"the checkpoint {folder} cannot be read ({type(err).__name__}: {_first_line(err)})"
            ) from None
        meta = dict(restored.meta)
        reference = restored.reference if abstract_reference is not None else None
        _verify((restored.state, reference), meta.pop("checksums", None), f"the checkpoint {folder}")
        return restored.state, meta, reference

    def save_stage(self, stage: int, params: Any, meta: dict) -> None:
        """The end-of-stage snapshot, written synchronously (the next stage needs it); then the stage's
        mid-stage checkpoints and, with ``keep_stages``, older snapshots are removed."""
        self.wait()
        self._ensure_space(params, f"the snapshot of stage {stage}")
        manager = self._manager(stage, "final")
        meta = {**meta, "checksums": tree_checksums(params)}
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
        self._drop_manager(stage, "steps")
        pruned = [s for s in self._snapshot_stages() if self.keep_stages and s <= stage - self.keep_stages]
        for old in pruned:
            self._drop_manager(old, "final")
        on_main_process(
            lambda: self._remove_after_stage(stage, pruned), f"remove the checkpoints stage {stage} no longer needs"
        )

    def _remove_after_stage(self, stage: int, pruned: list[int]) -> None:
        """Stage ``stage``'s mid-stage checkpoints, and the snapshots of ``pruned`` stages (keep_stages: the
        latest, the next stage's reference and starting point, always stays), listed in pruned_stages.json."""
        shutil.rmtree(str(self.root / f"stage_{stage}" / "steps"), ignore_errors=True)
        for old in pruned:
            shutil.rmtree(str(self.root / f"stage_{old}" / "final"))
        if pruned:
            (self.root / "pruned_stages.json").write_text(json.dumps(sorted(set(self.pruned_stages()) | set(pruned))))

    def pruned_stages(self) -> list[int]:
        path = self.root / "pruned_stages.json"
        return json.loads(path.read_text()) if path.exists() else []

    def _snapshot_stages(self) -> list[int]:
        stages = []
        for folder in sorted(self.root.glob("stage_*/final")):
            stage = int(folder.parent.name.split("_")[1])
            if self._manager(stage, "final").latest_step() is not None:
                stages.append(stage)
        return sorted(stages)

    def finished_stages(self) -> list[int]:
        """Stages whose snapshot was saved (also those removed since by keep_stages)."""
        return sorted(set(self._snapshot_stages()) | set(self.pruned_stages()))

    def load_stage(self, stage: int, abstract_params: Any) -> tuple[Any, dict]:
        """The stage's params laid out as ``abstract_params`` says; leaves without a sharding go to
        this host's first device (e.g. exporting a run trained on another mesh or machine)."""
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree_util.tree_map(
            lambda a: (
                a
                if getattr(a, "sharding", None) is not None
                else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local)
            ),
            abstract_params,
        )
        folder = self.root / f"stage_{stage}" / "final"
        if stage in self.pruned_stages():
            raise FileNotFoundError(
                f"{folder}: the snapshot of stage {stage} was removed (checkpoint.keep_stages kept only "
                "the last stages' snapshots)"
            )
        manager = self._manager(stage, "final")
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{self.root}: stage {stage} has no finished snapshot")
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        try:
            restored = manager.restore(0, args=args)
        except Exception as err:  # noqa: BLE001 (damaged files raise many types)
            if _machine_problem(err):
                raise
            raise CorruptCheckpoint(
                f"the snapshot of stage {stage} in {folder} cannot be read ({type(err).__name__}: {_first_line(err)})"
            ) from None
        meta = dict(restored.meta)
        _verify(restored.params, meta.pop("checksums", None), f"the snapshot of stage {stage} in {folder}")
        return restored.params, meta

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()


class _UnreadableCheckpoint(Exception):
    """A mid-stage checkpoint whose files cannot be restored."""


def _machine_problem(err: BaseException) -> bool:
    """Whether a failed restore is the machine's (memory, permissions, I/O), not the checkpoint's."""
    from sdpo_jax.cli.errors import environment_problem

    text = str(err)
    return environment_problem(err) is not None or any(
        code in text
        for code in ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Permission denied")
    )


def _bytes_written_here(x: Any) -> int:
    """Bytes of ``x`` this process writes: the first replica of each of its shards (all of a host array)."""
    shards = getattr(x, "addressable_shards", None)
    if shards is None:
        return int(np.prod(np.shape(x))) * np.asarray(x).dtype.itemsize if x is not None else 0
    return sum(shard.data.nbytes for shard in shards if shard.replica_id == 0)


def _move(source: epath.Path, target: epath.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(str(target), ignore_errors=True)
    shutil.move(str(source), str(target))


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__
