"""Hugging Face checkpoint folder -> (ModelConfig, parameter pytree of NumPy arrays), no torch.

The folder holds config.json and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; the files are read with the ``safetensors`` library
(``safe_open(..., framework="numpy")``; bfloat16 comes back as ``ml_dtypes.bfloat16``). Each tensor
is read with ``get_slice`` a block of at most ``_READ_ELEMENTS`` at a time, straight into its slot of a
pre-allocated (layer-stacked) array in the requested dtype, so peak host memory is the parameters once
plus one such block. Given target shardings, only each device's block is read (the rows/columns that
shard holds) and placed at once: peak host memory is one shard.

Refused with `CheckpointError` (one line naming the file): a file the library cannot read (truncated,
a damaged header), a missing or extra tensor, a shape that does not match config.json, an index that
names a missing shard. Buffers that older checkpoints carry but that are not parameters
(``rotary_emb.inv_freq``) are ignored; so is a ``lm_head.weight`` stored beside tied embeddings when
it equals them (an unequal one is an error).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers the dtype name "bfloat16", by which the library builds BF16 arrays)
import numpy as np
from safetensors import SafetensorError, safe_open

from sdpo_jax.checkpoint.param_mapping import TensorSpec, get_leaf, hf_names, set_leaf, tensor_specs
from sdpo_jax.errors import SdpoError
from sdpo_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_NON_PARAMETER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_READ_ELEMENTS = 1 << 22  # the most one get_slice copies out of a file before it lands in its block (16 MiB in float32)


class CheckpointError(SdpoError, ValueError):
    """A checkpoint folder whose files do not match what its config.json describes."""


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, from its index when there is one."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: not a safetensors index ({err!r})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise CheckpointError(f"{index_path}: lists shard {name!r}, which is not in the folder")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors checkpoints load)")


def load_hf_checkpoint(
    folder: str | os.PathLike, param_dtype: Any = np.float32, shardings: Any = None, config: ModelConfig | None = None
) -> tuple[ModelConfig, dict]:
    """Read config.json and every weight of a Hugging Face Llama-family checkpoint folder.

    ``config`` is the architecture to read: by default the folder's config.json as a causal LM (a
    caller that reads it as something else, say a reward model, passes what it read).

    Without ``shardings`` the parameters are host NumPy arrays. With ``shardings`` (a pytree of
    ``jax.sharding.Sharding`` shaped like the parameters) each leaf becomes a ``jax.Array`` laid out
    that way, and each distinct shard this process's devices hold is read from the files on its own
    (see `place_leaf`): host memory holds one shard at a time, never the model.
    """
    folder = os.fspath(folder)
    config = config or ModelConfig.from_pretrained(folder)
    dtype = np.dtype(param_dtype)
    params: dict = {}
    with ExitStack() as stack:
        checkpoint = HFTensors(folder, config, {path: _open(path, stack) for path in weight_files(folder)})
        for spec in tensor_specs(config):
            shape = checkpoint.leaf_shape(spec)
            read = functools.partial(checkpoint.read, spec, dtype=dtype)
            if shardings is None:
                leaf = read(tuple(slice(None) for _ in shape))
            else:
                leaf = place_leaf(shape, get_leaf(shardings, spec.path), read)
            set_leaf(params, spec.path, leaf)
        checkpoint.check_unexpected()
    return config, params


def place_leaf(shape: tuple[int, ...], sharding: Any, read: Callable[[tuple[slice, ...]], np.ndarray]) -> Any:
    """A ``jax.Array`` of ``shape`` laid out by ``sharding``, each shard read by ``read(index)``.

    ``read`` is called once per distinct shard index among this process's devices (replicas share
    one read); the block goes to its devices and its host copy is dropped before the next read.
    Unlike ``jax.make_array_from_callback``, which first collects every local shard of the leaf on
    the host, this keeps host memory at one shard.
    """
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        by_index.setdefault(tuple((s.start, s.stop, s.step) for s in index), []).append((device, index))
    arrays = {}
    for placements in by_index.values():
        block = read(placements[0][1])
        for device, _ in placements:
            arrays[device] = jax.device_put(block, device)
        jax.block_until_ready([arrays[device] for device, _ in placements])
        del block
    ordered = [arrays[device] for device in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, ordered)


class HFTensors:
    """The tensors of an opened checkpoint, checked against config.json, read in our layout.

    ``files`` maps each file's path to the library's open handle on it.
    """

    def __init__(self, folder: str, config: ModelConfig, files: dict[str, Any]):
        self.folder, self.config, self.files = folder, config, files
        self.location = _tensor_locations(files)
        self.expected: set[str] = set()
        for spec in tensor_specs(config):
            for _, name in hf_names(spec, config):
                self.expected.add(name)
                if name not in self.location:
                    raise CheckpointError(f"{folder}: tensor {name!r} is missing (config.json: {config.architecture})")
                shape = tuple(self._slice(name).get_shape())
                if shape != spec.hf_shape:
                    raise CheckpointError(
                        f"{self.location[name]}: tensor {name!r} has shape {list(shape)}, "
                        f"config.json implies {list(spec.hf_shape)}"
                    )

    def leaf_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """Our leaf's shape: decoder-layer tensors stacked on a leading [num_hidden_layers] axis."""
        return (self.config.num_hidden_layers, *spec.shape) if spec.per_layer else spec.shape

    def _slice(self, name: str) -> Any:
        """The library's lazy slice of tensor ``name``: ``get_shape()``, and ``[...]`` reads a block."""
        return self.files[self.location[name]].get_slice(name)

    def read(self, spec: TensorSpec, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
        """``leaf[index]`` of our leaf for ``spec`` in ``dtype``; only that block is read from the files."""
        names = dict(hf_names(spec, self.config))
        if not spec.per_layer:
            block = np.empty(_block_shape(index, spec.shape), dtype)
            self._read_into(block, names[None], spec, index)
            return block
        layers = range(self.config.num_hidden_layers)[index[0]]
        block = np.empty((len(layers), *_block_shape(index[1:], spec.shape)), dtype)
        for i, layer in enumerate(layers):
            self._read_into(block[i], names[layer], spec, index[1:])
        return block

    def _read_into(self, out: np.ndarray, name: str, spec: TensorSpec, index: tuple[slice, ...]) -> None:
        """Fill ``out`` (C-contiguous) with ``spec.to_ours(tensor)[index]``, reading only those elements of ``name``.

        Each HF axis is the flattening of some of our axes (`TensorSpec.hf_axis_groups`), so the block
        is, along each HF axis, a list of contiguous runs; ``out`` reshaped to the HF block's shape (and
        transposed back for a linear weight) is a view that takes each piece at its place.
        """
        bounds = _bounds(index, spec.shape)
        runs = [_runs([spec.shape[a] for a in group], [bounds[a] for a in group]) for group in spec.hf_axis_groups()]
        sizes = [sum(stop - start for start, stop in axis) for axis in runs]
        hf_out = out.reshape(sizes[::-1]).T if spec.transpose else out.reshape(sizes)
        runs[0] = _chunks(runs[0], _rows_per_read(math.prod(sizes[1:])))
        tensor = self._slice(name)
        for target, source in _pieces(runs):
            hf_out[target] = tensor[source]

    def _equal(self, a: str, b: str) -> bool:
        """Whether tensors ``a`` and ``b`` hold the same values, compared a block of rows at a time."""
        x, y = self._slice(a), self._slice(b)
        shape = x.get_shape()
        if shape != y.get_shape():
            return False
        rows = _rows_per_read(math.prod(shape[1:]))
        return all(
            np.array_equal(np.asarray(x[start:stop], np.float32), np.asarray(y[start:stop], np.float32))
            for start, stop in _chunks([(0, shape[0])], rows)
        )

    def check_unexpected(self) -> None:
        """No tensor beyond the expected ones, except known non-parameters and a tied copy of the embeddings."""
        for name, path in self.location.items():
            if name in self.expected or _NON_PARAMETER.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                if self._equal(name, "model.embed_tokens.weight"):
                    continue
                raise CheckpointError(
                    f"{path}: 'lm_head.weight' differs from the embeddings although config.json sets "
                    "tie_word_embeddings"
                )
            raise CheckpointError(
                f"{path}: unexpected tensor {name!r} for {self.config.architecture} (config.json in {self.folder})"
            )


def _open(path: str, stack: ExitStack) -> Any:
    """The library's handle on one safetensors file, closed with ``stack``; an unreadable file is a CheckpointError."""
    try:
        return stack.enter_context(safe_open(path, framework="numpy"))
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _tensor_locations(files: dict[str, Any]) -> dict[str, str]:
    """Each tensor's name -> the path of the file holding it; a name in two files is a CheckpointError."""
    location: dict[str, str] = {}
    for path, handle in files.items():
        for name in handle.keys():
            if name in location:
                raise CheckpointError(f"{path}: tensor {name!r} is also in {location[name]}")
            location[name] = path
    return location


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) of each unit-step slice of ``index`` on an array of ``shape``."""
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _block_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``array[index]`` for an array of ``shape``."""
    return tuple(stop - start for start, stop in _bounds(index, shape))


def _runs(shape: list[int], bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The contiguous runs, in order, of the row-major flat positions that unit-step ``bounds`` select in ``shape``.

    A block split on the outermost axis only (a range of heads in q_proj's heads x head_dim rows) is
    one run; one split further in is one run per position of the axes outside that split.
    """
    partial = [k for k, (start, stop) in enumerate(bounds) if (start, stop) != (0, shape[k])]
    last = partial[-1] if partial else 0
    inner = math.prod(shape[last + 1 :])
    strides = [math.prod(shape[k + 1 :]) for k in range(last)]
    start, stop = bounds[last]
    runs = []
    for outer in itertools.product(*(range(*b) for b in bounds[:last])):
        base = sum(i * stride for i, stride in zip(outer, strides))
        runs.append((base + start * inner, base + stop * inner))
    return runs


def _rows_per_read(row_elements: int) -> int:
    """How many rows of ``row_elements`` one read may copy: as many as fit in ``_READ_ELEMENTS``, at least one."""
    return max(1, _READ_ELEMENTS // row_elements)


def _chunks(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """``runs`` cut, in order, into pieces of at most ``size`` positions."""
    return [(start, min(start + size, stop)) for first, stop in runs for start in range(first, stop, size)]


def _pieces(runs: list[list[tuple[int, int]]]) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(target, source) slices for each combination of one run per axis: sources index the tensor,
    targets the block that packs the runs of each axis one after another."""
    placed = []
    for axis in runs:
        offsets = itertools.accumulate((stop - start for start, stop in axis), initial=0)
        placed.append(
            [(slice(offset, offset + stop - start), slice(start, stop)) for offset, (start, stop) in zip(offsets, axis)]
        )
    for combination in itertools.product(*placed):
        yield tuple(target for target, _ in combination), tuple(source for _, source in combination)
