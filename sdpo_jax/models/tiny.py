"""A tiny random-initialised Llama as a real Hugging Face folder, for smoke runs and tests.

``model.path = "tiny-random-llama"`` names it: a 2-layer Llama (hidden 64, 4 query / 2 key-value
heads, SwiGLU 176, tied embeddings) over the shipped 32000-token Llama tokenizer with a
Llama-2-style chat template (sdpo_jax/models/assets/llama_tokenizer). Weights are drawn with
`init_params` from a fixed seed, written once as safetensors into the cache
(``$SDPO_JAX_CACHE`` or ~/.cache/sdpo_jax) and read back like any checkpoint, so a smoke run
exercises every real code path (config.json, safetensors import, tokenizer, chat template)
without downloading anything. It knows nothing: its answers are noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax

from sdpo_jax.cache_dir import cache_dir as sdpo_cache_dir
from sdpo_jax.checkpoint.hf_export import save_hf_checkpoint
from sdpo_jax.models.config import ModelConfig
from sdpo_jax.models.llama import LlamaForCausalLM, init_params

TINY_RANDOM_NAME = "tiny-random-llama"
TOKENIZER_ASSETS = Path(__file__).resolve().parent / "assets" / "llama_tokenizer"
TINY_CONFIG = ModelConfig(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_SEED = 0


def tiny_random_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the tiny random model, written on first use (atomically: build, then rename)."""
    target = (Path(cache_dir) if cache_dir else sdpo_cache_dir()) / "random" / f"{TINY_RANDOM_NAME}-seed{_SEED}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        params = jax.device_get(init_params(LlamaForCausalLM(TINY_CONFIG), jax.random.key(_SEED)))
        save_hf_checkpoint(
            params, TINY_CONFIG, build, source_folder=TOKENIZER_ASSETS
        )  # tokenizer files from the assets
        build.replace(target)
    except OSError:
        shutil.rmtree(build, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        # another process finished first: its folder is as good as ours
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return target
