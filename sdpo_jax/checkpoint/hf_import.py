"""Hugging Face checkpoint folder -> (ModelConfig, parameter pytree of NumPy arrays), no torch.

The folder holds config.json and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Each tensor is copied from a memory-mapped file straight into
its slot of a pre-allocated (layer-stacked) array in the requested dtype, so peak host memory is
the parameters once plus one tensor. Given target shardings, each device's block is copied instead
(only the rows/columns that shard holds) and placed at once: peak host memory is one shard.

Refused with `CheckpointError` (one line naming the file): a missing or extra tensor, a shape that
does not match config.json, an index that names a missing shard. Buffers that older checkpoints
carry but that are not parameters (``rotary_emb.inv_freq``) are ignored; so is a ``lm_head.weight``
stored beside tied embeddings when it equals them (an unequal one is an error).
"""
from __future__ import annotations

import functools
import json
import os
import re
from contextlib import ExitStack
from typing import Any, Callable

import jax
import numpy as np

from sdpo_jax.checkpoint.param_mapping import TensorSpec, get_leaf, hf_names, set_leaf, tensor_specs
from sdpo_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile
from sdpo_jax.errors import SdpoError
from sdpo_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_NON_PARAMETER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


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


def load_hf_checkpoint(folder: str | os.PathLike, param_dtype: Any = np.float32,
                       shardings: Any = None, config: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """Read config.json and every weight of a Hugging Face Llama-family checkpoint folder.

    ``config`` is the architecture to read: by default the folder's config.json as a causal LM (a
    caller that reads it as something else, say a reward model, passes what it read).

    Without ``shardings`` the parameters are host NumPy arrays. With ``shardings`` (a pytree of
    ``jax.sharding.Sharding`` shaped like the parameters) each leaf becomes a ``jax.Array`` laid out
    that way, and each distinct shard this process's devices hold is copied from the mapped
    files on its own (see `place_leaf`): host memory holds one shard at a time, never the model.
    """
    folder = os.fspath(folder)
    config = config or ModelConfig.from_pretrained(folder)
    dtype = np.dtype(param_dtype)
    params: dict = {}
    with ExitStack() as stack:
        checkpoint = HFTensors(folder, config, [stack.enter_context(_open(path)) for path in weight_files(folder)])
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
    """The tensors of an opened checkpoint, checked against config.json, read in our layout."""

    def __init__(self, folder: str, config: ModelConfig, files: list[SafetensorsFile]):
        self.folder, self.config = folder, config
        self.location = _tensor_locations(files)
        self.expected: set[str] = set()
        for spec in tensor_specs(config):
            for _, name in hf_names(spec, config):
                self.expected.add(name)
                if name not in self.location:
                    raise CheckpointError(f"{folder}: tensor {name!r} is missing (config.json: {config.architecture})")
                file = self.location[name]
                if file.shape(name) != spec.hf_shape:
                    raise CheckpointError(
                        f"{file.path}: tensor {name!r} has shape {list(file.shape(name))}, "
                        f"config.json implies {list(spec.hf_shape)}"
                    )

    def leaf_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """Our leaf's shape: decoder-layer tensors stacked on a leading [num_hidden_layers] axis."""
        return (self.config.num_hidden_layers, *spec.shape) if spec.per_layer else spec.shape

    def _ours(self, name: str, spec: TensorSpec) -> np.ndarray:
        return spec.to_ours(self.location[name][name])  # a view into the mapping: transpose and reshape copy nothing

    def read(self, spec: TensorSpec, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
        """``leaf[index]`` of our leaf for ``spec`` in ``dtype``; only that block is copied out of the files."""
        names = dict(hf_names(spec, self.config))
        if not spec.per_layer:
            return np.array(self._ours(names[None], spec)[index], dtype)
        layers = range(self.config.num_hidden_layers)[index[0]]
        block = None
        for i, layer in enumerate(layers):
            part = self._ours(names[layer], spec)[index[1:]]
            if block is None:
                block = np.empty((len(layers), *part.shape), dtype)
            block[i] = part
        return block

    def _equal(self, a: str, b: str) -> bool:
        # No view into the mapping may outlive this call: an exception's traceback would keep it and
        # the file could not be closed.
        return bool(np.array_equal(np.asarray(self.location[a][a], np.float32), np.asarray(self.location[b][b], np.float32)))

    def check_unexpected(self) -> None:
        """No tensor beyond the expected ones, except known non-parameters and a tied copy of the embeddings."""
        for name, file in self.location.items():
            if name in self.expected or _NON_PARAMETER.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                if self._equal(name, "model.embed_tokens.weight"):
                    continue
                raise CheckpointError(
                    f"{file.path}: 'lm_head.weight' differs from the embeddings although config.json sets tie_word_embeddings"
                )
            raise CheckpointError(f"{file.path}: unexpected tensor {name!r} for {self.config.architecture} "
                                  f"(config.json in {self.folder})")


def _open(path: str) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsError as err:
        raise CheckpointError(str(err)) from None


def _tensor_locations(files: list[SafetensorsFile]) -> dict[str, SafetensorsFile]:
    location: dict[str, SafetensorsFile] = {}
    for file in files:
        for name in file.keys():
            if name in location:
                raise CheckpointError(f"{file.path}: tensor {name!r} is also in {location[name].path}")
            location[name] = file
    return location
