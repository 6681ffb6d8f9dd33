"""Tiny real Hugging Face checkpoints of each supported family, built locally with transformers.

Weights are random (seeded) with a larger init scale than training uses, so logits are of
order 1-10 and parity tolerances mean something.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import transformers

from data_paths import TOKENIZER_FILES

_COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    max_position_embeddings=256,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama3": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=5),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6),
    ),
    "solar": (
        transformers.LlamaConfig,
        dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, rms_norm_eps=1e-5),
    ),
}


def make_hf_checkpoint(
    family: str,
    folder: str | os.PathLike,
    seed: int = 0,
    with_tokenizer: bool = True,
    auto_class=transformers.AutoModelForCausalLM,
    **changes,
) -> Path:
    """Save a random tiny ``family`` model of ``auto_class`` (float32 safetensors) and the Llama tokenizer files."""
    config_class, overrides = FAMILIES[family]
    config = config_class(**{**_COMMON, **overrides, **changes})
    torch.manual_seed(seed)
    model = auto_class.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # norms are initialised to one; make them informative
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    folder = Path(folder)
    model.save_pretrained(folder)
    if with_tokenizer:
        shutil.copyfile(TOKENIZER_FILES["llama"][0], folder / "tokenizer.json")
        shutil.copyfile(TOKENIZER_FILES["llama"][1], folder / "tokenizer_config.json")
    return folder


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


def make_chat_checkpoint(folder: str | os.PathLike) -> Path:
    """A tiny Llama 2 with the full 32000-token Llama vocabulary and a chat template, for text data."""
    return add_chat_template(make_hf_checkpoint("llama2", folder, vocab_size=32000))


def add_chat_template(folder: Path) -> Path:
    """Give the checkpoint's tokenizer `CHAT_TEMPLATE`."""
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def make_reward_checkpoint(
    family: str, folder: str | os.PathLike, seed: int = 0, chat_template: bool = False, **changes
) -> Path:
    """A random tiny ``family`` reward model: transformers' *ForSequenceClassification with one label
    (pad_token_id 0) over the full 32000-token Llama vocabulary, the Llama tokenizer files, and
    `CHAT_TEMPLATE` when ``chat_template``."""
    changes = {"num_labels": 1, "vocab_size": 32000, **changes}
    folder = make_hf_checkpoint(
        family, folder, seed, auto_class=transformers.AutoModelForSequenceClassification, **changes
    )
    return add_chat_template(folder) if chat_template else folder


def load_torch_reward_model(folder: str | os.PathLike):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def load_torch_model(folder: str | os.PathLike, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
