"""Shared helpers for the data tests: a model-like tokenizer folder, configs, file writers."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from data_paths import TOKENIZER_FILES
from sdpo_jax.data import get_data_config

# An Anthropic-style template: what hh-rlhf transcripts look like, with BOS/EOS around turns.
HH_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}\n\nHuman: {{ m['content'] }}"
    "{% else %}\n\nAssistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n\nAssistant:{% endif %}"
)


def make_model_dir(path, name: str = "llama", chat_template: str | None = HH_TEMPLATE) -> str:
    """A folder that AutoTokenizer.from_pretrained reads like a model checkpoint's."""
    os.makedirs(path, exist_ok=True)
    tokenizer_json, tokenizer_config = TOKENIZER_FILES[name]
    shutil.copy(tokenizer_json, os.path.join(path, "tokenizer.json"))
    with open(tokenizer_config) as f:
        config = json.load(f)
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("gpt2"), "gpt2", None))


@pytest.fixture
def config(tmp_path):
    c = get_data_config()
    c.cache_dir = str(tmp_path / "cache")
    return c


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def triple(pairs, i: int):
    return pairs.prompt_ids(i), pairs.chosen_ids(i), pairs.rejected_ids(i)
