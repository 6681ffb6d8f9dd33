"""Parameter pytree -> Hugging Face checkpoint folder that transformers, vLLM and lm-eval load.

Writes config.json, generation_config.json, ``model.safetensors`` (or shards of at most
``max_shard_bytes`` named model-0000i-of-0000n.safetensors plus model.safetensors.index.json),
and the tokenizer files of the source model folder. Tensors are produced and written one at a
time (`safetensors_io.LazyTensor`), so host memory holds one tensor beyond the parameters.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from sdpo_jax.checkpoint.hf_import import INDEX_FILE, SINGLE_FILE
from sdpo_jax.checkpoint.param_mapping import get_leaf, hf_names, tensor_specs
from sdpo_jax.checkpoint.safetensors_io import STORAGE_DTYPES, LazyTensor, tensor_nbytes, write_safetensors
from sdpo_jax.models.config import ModelConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def hf_tensors(params: Any, config: ModelConfig, dtype: str = "float32") -> list[tuple[str, LazyTensor]]:
    """(HF name, lazy tensor in ``dtype``) for every parameter, in Hugging Face's order."""
    np_dtype = np.dtype(STORAGE_DTYPES[dtype])
    tensors = []
    for spec in tensor_specs(config):
        leaf = get_leaf(params, spec.path)
        for layer, name in hf_names(spec, config):

            def compute(leaf=leaf, layer=layer, spec=spec):
                value = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
                return spec.to_hf(value)

            tensors.append((name, LazyTensor(spec.hf_shape, np_dtype, compute)))
    return tensors


def save_hf_checkpoint(
    params: Any,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    source_folder: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Write a loadable HF folder; tokenizer and generation settings come from ``source_folder``.

    config.json is the source's own (so every field transformers reads is preserved) with the
    dtype updated, or, without a source, the one ``config`` describes.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {tuple(STORAGE_DTYPES)}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_tensors(params, config, dtype)
    _write_weights(out_dir, tensors, max_shard_bytes)
    _write_json(os.path.join(out_dir, "config.json"), _config_json(config, dtype, source_folder))
    _write_json(os.path.join(out_dir, "generation_config.json"), _generation_config(config, source_folder))
    if source_folder is not None:
        for name in TOKENIZER_FILES:
            path = os.path.join(os.fspath(source_folder), name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out_dir, name))
    return out_dir


def _write_weights(out_dir: str, tensors: list[tuple[str, LazyTensor]], max_shard_bytes: int) -> None:
    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    shard_bytes = 0
    for name, tensor in tensors:
        size = tensor_nbytes(tensor)
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, tensor))
        shard_bytes += size
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, SINGLE_FILE), shards[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file_name), shard, metadata={"format": "pt"})
        weight_map.update({name: file_name for name, _ in shard})
    total = sum(tensor_nbytes(t) for _, t in tensors)
    _write_json(os.path.join(out_dir, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})


def _config_json(config: ModelConfig, dtype: str, source_folder) -> dict:
    source = os.path.join(os.fspath(source_folder), "config.json") if source_folder is not None else None
    if source and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            hf = json.load(f)
        if ModelConfig.from_hf_dict(hf, source) != config:
            raise ValueError(f"{source}: describes a different architecture than the parameters being exported")
        hf.pop("torch_dtype", None)
        hf["dtype"] = dtype
        return hf
    return config.to_hf_dict(dtype)


def _generation_config(config: ModelConfig, source_folder) -> dict:
    source = os.path.join(os.fspath(source_folder), "generation_config.json") if source_folder is not None else None
    if source and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return json.load(f)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    return generation


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
