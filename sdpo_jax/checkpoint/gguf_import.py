"""Convert a llama.cpp GGUF file of a Llama-family model into a Hugging Face model folder.

:func:`convert_gguf_to_hf` writes ``config.json``, ``generation_config.json``, ``model.safetensors``
(float32, bfloat16 or float16), ``tokenizer.json`` and ``tokenizer_config.json``, which
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load like any ``LlamaForCausalLM``
checkpoint. :func:`cached_hf_from_gguf` does that once per GGUF file and dtype into a cache.

What the conversion undoes:

* GGUF lists tensor dimensions in ggml order (fastest-varying first), i.e. reversed from NumPy.
  ``gguf.GGUFReader`` already exposes data in NumPy order, so a weight of ggml shape
  ``[in_features, out_features]`` arrives as ``(out_features, in_features)`` exactly like a torch
  ``nn.Linear`` weight; every shape is checked against the one the config implies.
* Quantized blocks (Q8_0, Q4_0, Q4_1, K-quants, ...) are expanded to float32 with
  ``gguf.quants.dequantize``, one tensor at a time while ``model.safetensors`` is written.
* llama.cpp's ``convert_hf_to_gguf.py`` reorders the rows of ``attn_q`` and ``attn_k`` because its
  RoPE rotates adjacent pairs (2i, 2i+1) while Hugging Face Llama rotates the two halves
  (i, i + head_dim/2). See :func:`unpermute_rope_rows`.
* The tokenizer is rebuilt with the ``tokenizers`` library from the GGUF vocabulary, merges,
  token types and ``tokenizer.ggml.pre`` (see :func:`build_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from sdpo_jax.cache_dir import cache_dir as sdpo_cache_dir
from sdpo_jax.checkpoint.safetensors_io import STORAGE_DTYPES, LazyTensor, write_safetensors
from sdpo_jax.errors import SdpoError

QType = gguf.GGMLQuantizationType

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TENSOR_TYPES = (
    QType.F32,
    QType.F16,
    QType.BF16,
    QType.Q4_0,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q8_0,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
)
GGUF_MAGIC = b"GGUF"

# llama.cpp token types (gguf.TokenType): 3 is CONTROL (<|im_end|>), 4 is USER_DEFINED (<think>).
_CONTROL_TOKEN, _USER_DEFINED_TOKEN = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
_HASH_CHUNK = 1 << 22


class GGUFImportError(SdpoError, ValueError):
    """A GGUF file that cannot be converted; the message is one line naming the file and the reason."""


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open ``path`` with ``gguf.GGUFReader``, turning a missing, foreign or corrupt file into GGUFImportError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    with open(path, "rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:
        raise GGUFImportError(f"{path}: corrupt or unsupported GGUF file ({_one_line(err)})") from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value pairs of the file as Python values (strings, numbers, bools, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _required(metadata: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise GGUFImportError(f"{path}: metadata key {key!r} is missing")
    return metadata[key]


def _check_architecture(metadata: dict[str, Any], path: Path) -> None:
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{path}: architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


# ---------------------------------------------------------------------------------------------
# Model shape and config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama model, read from ``llama.*`` metadata."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], path: Path) -> LlamaShape:
        """Read the sizes; ``head_dim`` is ``attention.key_length``, else ``hidden_size / heads``."""
        hidden = int(_required(metadata, "llama.embedding_length", path))
        heads = int(_required(metadata, "llama.attention.head_count", path))
        head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
        value_dim = int(metadata.get("llama.attention.value_length", head_dim))
        rope_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
        if value_dim != head_dim or rope_dim != head_dim:
            raise GGUFImportError(
                f"{path}: key length {head_dim}, value length {value_dim} and rope dimension {rope_dim} "
                "must be equal for a Hugging Face Llama"
            )
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = metadata.get("llama.vocab_size", len(tokens) if tokens else None)
        if vocab is None:
            raise GGUFImportError(
                f"{path}: neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens' gives the vocabulary size"
            )
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_required(metadata, "llama.feed_forward_length", path)),
            num_layers=int(_required(metadata, "llama.block_count", path)),
            num_heads=heads,
            num_kv_heads=int(metadata.get("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
        )

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face Llama tensor name -> shape, for every tensor except ``lm_head.weight``."""
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = {
            "self_attn.q_proj.weight": (q_rows, self.hidden_size),
            "self_attn.k_proj.weight": (kv_rows, self.hidden_size),
            "self_attn.v_proj.weight": (kv_rows, self.hidden_size),
            "self_attn.o_proj.weight": (self.hidden_size, q_rows),
            "mlp.gate_proj.weight": (self.intermediate_size, self.hidden_size),
            "mlp.up_proj.weight": (self.intermediate_size, self.hidden_size),
            "mlp.down_proj.weight": (self.hidden_size, self.intermediate_size),
            "input_layernorm.weight": (self.hidden_size,),
            "post_attention_layernorm.weight": (self.hidden_size,),
        }
        shapes = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        for layer in range(self.num_layers):
            shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
        return shapes


def _rope_scaling(metadata: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The Hugging Face ``rope_scaling`` dict for ``llama.rope.scaling.*`` (linear or yarn), or None."""
    kind = metadata.get("llama.rope.scaling.type", "none")
    factor = metadata.get("llama.rope.scaling.factor")
    if kind == "none":
        return None
    if kind == "linear" and factor is not None:
        return {"rope_type": "linear", "factor": float(factor)}
    original = metadata.get("llama.rope.scaling.original_context_length")
    if kind == "yarn" and factor is not None and original is not None:
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original)}
    raise GGUFImportError(f"{path}: rope scaling {kind!r} (factor {factor}) is not supported; supported: linear, yarn")


def _special_token_ids(metadata: dict[str, Any]) -> dict[str, int]:
    """``{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}`` for the ids the file states."""
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    return {
        hf: int(metadata[f"tokenizer.ggml.{key}"]) for hf, key in keys.items() if f"tokenizer.ggml.{key}" in metadata
    }


def llama_config(metadata: dict[str, Any], shape: LlamaShape, tied: bool, dtype: str, path: Path) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` with the sizes and settings of the GGUF file."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(metadata.get("llama.context_length", 2048)),
        "tie_word_embeddings": tied,
        "dtype": dtype,
        **_special_token_ids(metadata),
    }
    rope_scaling = _rope_scaling(metadata, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None when Llama has no such tensor."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight"
    return None


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, giving the Hugging Face (rotate-half) row order.

    With ``D = head_dim`` and head ``h``, Hugging Face row ``h*D + s*D/2 + j`` (half ``s`` in {0, 1},
    ``j < D/2``) pairs with row ``h*D + D/2 + j``. llama.cpp's converter applies
    ``w.reshape(n_heads, 2, D/2, ...).swapaxes(1, 2)``, which moves that row to ``h*D + 2*j + s`` so
    the pairs become adjacent. Its inverse reads the GGUF rows as ``(n_heads, D/2, 2, ...)`` and swaps
    the same two axes back. ``n_heads`` is the query head count for ``attn_q`` and the key/value head
    count for ``attn_k``.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantized(tensor: gguf.ReaderTensor, dtype: np.dtype, rope_heads: int | None) -> LazyTensor:
    """One GGUF tensor in NumPy order, dequantized (and q/k rows un-permuted) only when written."""
    shape = tuple(reversed([int(dim) for dim in tensor.shape]))

    def compute() -> np.ndarray:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        return weight if rope_heads is None else unpermute_rope_rows(weight, rope_heads)

    return LazyTensor(shape, dtype, compute)


def _rope_heads(hf_name: str, shape: LlamaShape) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return shape.num_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return shape.num_kv_heads
    return None


def plan_tensors(
    reader: gguf.GGUFReader, shape: LlamaShape, dtype: np.dtype, path: Path
) -> list[tuple[str, LazyTensor]]:
    """Map every GGUF tensor to its Hugging Face name, checking name, type and shape before any work.

    ``lm_head.weight`` is optional (absent: the embeddings are tied); every other tensor the config
    implies must be present exactly once.
    """
    expected = shape.hf_shapes()
    expected["lm_head.weight"] = (shape.vocab_size, shape.hidden_size)
    planned = []
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is None or hf_name not in expected:
            raise GGUFImportError(
                f"{path}: tensor {tensor.name!r} has no counterpart in a {shape.num_layers}-layer Hugging Face Llama"
            )
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise GGUFImportError(
                f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which is not supported; "
                f"supported: {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}"
            )
        lazy = dequantized(tensor, dtype, _rope_heads(hf_name, shape))
        if lazy.shape != expected[hf_name]:
            raise GGUFImportError(
                f"{path}: tensor {tensor.name!r} has shape {list(lazy.shape)} (NumPy order), "
                f"but the metadata implies {list(expected[hf_name])} for {hf_name}"
            )
        planned.append((hf_name, lazy))
    missing = sorted(set(shape.hf_shapes()) - {name for name, _ in planned})
    if missing:
        raise GGUFImportError(f"{path}: {len(missing)} tensors are missing, e.g. {missing[0]}")
    return planned


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split: ``'s|'t|... | ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """llama.cpp's "smollm": every digit on its own (``\\p{N}``), then GPT-2's byte-level split."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()])


# tokenizer.ggml.pre -> pre-tokenizer, for tokenizer.ggml.model == "gpt2" (byte-level BPE).
BPE_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _gpt2_pre_tokenizer,
    "smollm": _smollm_pre_tokenizer,
}
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)


def _token_at(tokens: list[str], metadata: dict[str, Any], key: str, path: Path) -> str | None:
    """The token string whose id ``tokenizer.ggml.<key>`` names, or None when the key is absent."""
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise GGUFImportError(f"{path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary of {len(tokens)}")
    return tokens[token_id]


def _template_processor(bos: str | None, eos: str | None, tokens: list[str]) -> processors.PostProcessor:
    """Byte-level offsets, plus BOS before and/or EOS after each sequence (as llama.cpp's add_bos/add_eos)."""
    prefix, suffix = (f"{bos}:0 " if bos else ""), (f" {eos}:0" if eos else "")
    pair_prefix, pair_suffix = (f" {bos}:1" if bos else ""), (f" {eos}:1" if eos else "")
    specials = [(token, tokens.index(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)]
    template = processors.TemplateProcessing(
        single=f"{prefix}$A:0{suffix}",
        pair=f"{prefix}$A:0{suffix}{pair_prefix} $B:1{pair_suffix}",
        special_tokens=specials,
    )
    return processors.Sequence([processors.ByteLevel(trim_offsets=False), template])


def build_tokenizer(metadata: dict[str, Any], path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """Rebuild ``(tokenizer.json, tokenizer_config.json)`` from the ``tokenizer.*`` metadata.

    Supported: ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, tokens already spelled in GPT-2's
    byte alphabet) with a ``tokenizer.ggml.pre`` from :data:`BPE_PRE_TOKENIZERS`. Control tokens
    (type 3) become special added tokens, user-defined ones (type 4) plain added tokens, so both are
    matched whole in text as llama.cpp does.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise GGUFImportError(
            f"{path}: tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in BPE_PRE_TOKENIZERS:
        raise GGUFImportError(
            f"{path}: tokenizer pre-type {pre!r} is not supported; supported: {', '.join(BPE_PRE_TOKENIZERS)}"
        )
    tokens = list(_required(metadata, "tokenizer.ggml.tokens", path))
    if len(set(tokens)) != len(tokens):
        raise GGUFImportError(f"{path}: tokenizer.ggml.tokens lists {len(tokens) - len(set(tokens))} duplicate tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in _required(metadata, "tokenizer.ggml.merges", path)]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = BPE_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, metadata.get("tokenizer.ggml.token_type") or [])

    special = {
        name: _token_at(tokens, metadata, key, path)
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    tokenizer.post_processor = _template_processor(
        special["bos_token"] if add_bos else None, special["eos_token"] if add_eos else None, tokens
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get("llama.context_length", 2048)),
        **{name: token for name, token in special.items() if token is not None},
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, config


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Add control tokens as special and user-defined tokens as plain added tokens (ids unchanged)."""
    by_type = {_CONTROL_TOKEN: [], _USER_DEFINED_TOKEN: []}
    for token, token_type in zip(tokens, token_types):
        if token_type in by_type:
            by_type[token_type].append(token)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in by_type[_CONTROL_TOKEN]])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in by_type[_USER_DEFINED_TOKEN]])


# ---------------------------------------------------------------------------------------------
# Conversion and cache
# ---------------------------------------------------------------------------------------------


def _output_dtype(dtype: str) -> np.dtype:
    if dtype not in STORAGE_DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not supported; supported: {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


def _empty_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (or accept an empty one): conversion never mixes with an existing checkpoint."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFImportError(f"{out}: output folder exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert a Llama GGUF file into a Hugging Face folder at ``out_dir`` (created; must be empty).

    Everything is validated (architecture, sizes, tensor names, types and shapes, tokenizer) before
    any file is written; errors are :class:`GGUFImportError` with a one-line message.
    Returns ``Path(out_dir)``.
    """
    out_dtype = _output_dtype(dtype)
    path = Path(gguf_path)
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    _check_architecture(metadata, path)
    shape = LlamaShape.from_metadata(metadata, path)
    tensors = plan_tensors(reader, shape, out_dtype, path)
    tied = all(name != "lm_head.weight" for name, _ in tensors)
    config = llama_config(metadata, shape, tied, dtype, path)
    tokenizer, tokenizer_config = build_tokenizer(metadata, path)

    out = _empty_out_dir(out_dir)
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _special_token_ids(metadata))
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def file_identity(path: Path) -> str:
    """``<sha256 of the whole file>-<size in bytes>``: the cache key of a GGUF file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return f"{digest.hexdigest()}-{path.stat().st_size}"


def cached_hf_from_gguf(
    gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, dtype: str = "float32"
) -> Path:
    """Convert ``gguf_path`` once into ``<cache_dir>/hf_from_gguf/<sha256>-<size>-<dtype>`` and return it.

    The key is the SHA-256 and size of the whole file, so a renamed copy hits the cache and an
    edited file does not. The conversion goes to a hidden temporary folder that is renamed into
    place only when complete: a killed conversion never leaves a folder that looks finished.
    """
    _output_dtype(dtype)
    path = Path(gguf_path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    root = Path(cache_dir) / "hf_from_gguf" if cache_dir else sdpo_cache_dir("hf_from_gguf")
    final = root / f"{file_identity(path)}-{dtype}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        convert_gguf_to_hf(path, staging, dtype)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():  # otherwise a concurrent conversion finished first; use its folder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
