"""Hugging Face checkpoint folder -> (ModelConfig, parameter pytree of NumPy arrays), no torch.

The folder holds config.json and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Each tensor is copied from a memory-mapped file straight into
its slot of a pre-allocated (layer-stacked) array in the requested dtype, so peak host memory is
the parameters once plus one tensor.

Refused with `CheckpointError` (one line naming the file): a missing or extra tensor, a shape that
does not match config.json, an index that names a missing shard. Buffers that older checkpoints
carry but that are not parameters (``rotary_emb.inv_freq``) are ignored; so is a ``lm_head.weight``
stored beside tied embeddings when it equals them (an unequal one is an error).
"""
from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from typing import Any

import numpy as np

from sdpo_jax.checkpoint.param_mapping import hf_names, set_leaf, tensor_specs
from sdpo_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile
from sdpo_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_NON_PARAMETER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
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


def load_hf_checkpoint(folder: str | os.PathLike, param_dtype: Any = np.float32) -> tuple[ModelConfig, dict]:
    """Read config.json and every weight of a Hugging Face Llama-family checkpoint folder."""
    folder = os.fspath(folder)
    config = ModelConfig.from_pretrained(folder)
    dtype = np.dtype(param_dtype)
    with ExitStack() as stack:
        files = [stack.enter_context(_open(path)) for path in weight_files(folder)]
        location = _tensor_locations(files)
        params: dict = {}
        expected: set[str] = set()
        for spec in tensor_specs(config):
            stacked = np.empty((config.num_hidden_layers, *spec.shape) if spec.per_layer else spec.shape, dtype)
            for layer, name in hf_names(spec, config):
                expected.add(name)
                if name not in location:
                    raise CheckpointError(f"{folder}: tensor {name!r} is missing (config.json: {config.architecture})")
                file = location[name]
                if file.shape(name) != spec.hf_shape:
                    raise CheckpointError(
                        f"{file.path}: tensor {name!r} has shape {list(file.shape(name))}, "
                        f"config.json implies {list(spec.hf_shape)}"
                    )
                target = stacked if layer is None else stacked[layer]
                target[...] = spec.to_ours(file[name])
            set_leaf(params, spec.path, stacked)
        _check_unexpected(folder, location, expected, params, config)
    return config, params


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


def _check_unexpected(folder: str, location: dict, expected: set[str], params: dict, config: ModelConfig) -> None:
    for name, file in location.items():
        if name in expected or _NON_PARAMETER.search(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            if np.array_equal(np.asarray(file[name], np.float32), params["embed_tokens"].astype(np.float32)):
                continue
            raise CheckpointError(
                f"{file.path}: 'lm_head.weight' differs from the embeddings although config.json sets tie_word_embeddings"
            )
        raise CheckpointError(f"{file.path}: unexpected tensor {name!r} for {config.architecture} (config.json in {folder})")
