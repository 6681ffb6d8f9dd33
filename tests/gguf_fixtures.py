"""Builders for small llama.cpp-style GGUF files, written independently of sdpo_jax's importer.

``write_llama_gguf`` does what llama.cpp's ``convert_hf_to_gguf.py`` does for a Llama: it renames
the tensors, permutes the rows of q and k for llama.cpp's RoPE layout, quantizes with
``gguf.quants.quantize`` and stores the tokenizer as ``tokenizer.ggml.*`` metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_paths import TOKENIZER_FILES

QType = gguf.GGMLQuantizationType
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as GGUF stores it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int


def truncated_gpt2_vocab(n_merges: int = 1000) -> Vocab:
    """GPT-2's 256 byte tokens and first ``n_merges`` merges (merge i creates token 256 + i), plus
    three control tokens and one user-defined token."""
    model = json.loads(TOKENIZER_FILES["gpt2"][0].read_text(encoding="utf-8"))["model"]
    by_id = {index: token for token, index in model["vocab"].items()}
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    tokens = [by_id[i] for i in range(256 + n_merges)]
    controls = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = (
        [int(gguf.TokenType.NORMAL)] * len(tokens)
        + [int(gguf.TokenType.CONTROL)] * 3
        + [int(gguf.TokenType.USER_DEFINED)]
    )
    tokens += controls + ["<think>"]
    return Vocab(
        tokens,
        types,
        merges[:n_merges],
        bos_id=tokens.index("<|im_start|>"),
        eos_id=tokens.index("<|im_end|>"),
        pad_id=tokens.index("<|endoftext|>"),
    )


def tiny_llama(
    vocab_size: int, tied: bool, hidden: int = 64, intermediate: int = 128, seed: int = 0
) -> LlamaForCausalLM:
    """A random 2-layer Llama (4 heads, 2 KV heads) with non-trivial norm weights, in float32."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute for attn_q / attn_k rows."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_name(hf_name: str) -> str:
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{block[rest.removesuffix('.weight')]}.weight"


def _encode(weight: np.ndarray, qtype: QType, rng: np.random.Generator) -> np.ndarray:
    """``weight`` in ``qtype``. K-quants cannot be quantized by gguf.quants, so they get random block
    bytes below 0x3C: every float16 field (scales, mins) then decodes to a finite value below 1."""
    if qtype in (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K):
        byte_shape = gguf.quants.quant_shape_to_byte_shape(weight.shape, qtype)
        return rng.integers(0, 0x3C, size=byte_shape, dtype=np.uint8)
    return gguf.quants.quantize(weight, qtype)


def write_llama_gguf(
    path: Path,
    model: LlamaForCausalLM,
    vocab: Vocab,
    qtype: QType = QType.F32,
    *,
    architecture: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "gpt-2",
    add_bos: bool = True,
    overrides: dict[str, Any] | None = None,
    raw_types: dict[str, QType] | None = None,
) -> Path:
    """Write ``model`` and ``vocab`` as a llama.cpp GGUF file; 2-D weights in ``qtype``, norms in F32.

    ``overrides`` replaces metadata values (str -> string, int -> uint32); ``raw_types`` stores the
    named GGUF tensors as zero bytes of another type, to exercise unsupported types.
    """
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (overrides or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)

    rng = np.random.default_rng(0)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        name = _gguf_name(hf_name)
        if name in (raw_types or {}):
            raw_type = raw_types[name]
            writer.add_tensor(
                name,
                np.zeros(gguf.quants.quant_shape_to_byte_shape(weight.shape, raw_type), np.uint8),
                raw_dtype=raw_type,
            )
        elif weight.ndim == 1:
            writer.add_tensor(name, weight.astype(np.float32))
        else:
            writer.add_tensor(name, _encode(weight, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
