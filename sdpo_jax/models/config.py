"""The architecture of a Llama-family model, read from and written to a Hugging Face config.json.

One dataclass covers Llama 2, Llama 3/3.1/3.2 (llama3 RoPE scaling), Mistral (sliding window),
Qwen2 (bias on q/k/v) and SOLAR (Llama shape): they share the decoder block

    h = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(.)), v_proj(.)))
    y = h + down_proj(silu(gate_proj(rmsnorm(h))) * up_proj(rmsnorm(h)))

and differ only in the fields below. Anything a field cannot express is refused with
`UnsupportedModelError` rather than approximated.

A sequence classifier (``*ForSequenceClassification``, the usual form of an open reward model) is
the same decoder with a ``score`` head [hidden, num_labels] in place of the LM head; it is read
only where a caller asks for it (``architectures=tuple(SEQUENCE_CLASSIFIERS)``), so a reward
model is never taken for a causal LM.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from sdpo_jax.errors import SdpoError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# each sequence classifier -> the causal LM whose decoder it shares
SEQUENCE_CLASSIFIERS = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
}
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(SdpoError, ValueError):
    """A checkpoint whose architecture or settings this project cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder (names follow Hugging Face)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen copy of HF's rope parameters
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_labels: int | None = None  # outputs of a sequence classifier's score head; None for a causal LM

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def decoder_architecture(self) -> str:
        """The causal-LM architecture whose decoder this model has (itself for a causal LM)."""
        return SEQUENCE_CLASSIFIERS.get(self.architecture, self.architecture)

    @property
    def untied_lm_head(self) -> bool:
        """Whether the model has an ``lm_head`` matrix of its own: a causal LM with untied embeddings."""
        return self.num_labels is None and not self.tie_word_embeddings

    @property
    def num_params(self) -> int:
        """Number of parameters, embeddings and head included (tied head counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        head = d * v if self.untied_lm_head else d * (self.num_labels or 0)
        return v * d + self.num_hidden_layers * per_layer + d + head

    @classmethod
    def from_hf_dict(
        cls,
        hf: Mapping[str, Any],
        source: str = "config.json",
        architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES,
    ) -> ModelConfig:
        """Build from a Hugging Face config dict (transformers 4 or 5 layout) of one of ``architectures``."""
        named = hf.get("architectures") or []
        architecture = named[0] if named else _architecture_from_model_type(hf.get("model_type"), source)
        if architecture not in architectures:
            raise UnsupportedModelError(
                f"{source}: architecture {architecture!r} is not supported; supported: {', '.join(architectures)}"
            )
        decoder = SEQUENCE_CLASSIFIERS.get(architecture, architecture)
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        heads = _size(hf, "num_attention_heads", source)
        hidden = _size(hf, "hidden_size", source)
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = _number(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)), float, "rope_theta", source)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope.pop("type", None)
        rope["rope_type"] = rope_type
        return cls(
            vocab_size=_size(hf, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_size(hf, "intermediate_size", source),
            num_hidden_layers=_size(hf, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=_size(hf, "num_key_value_heads", source, default=heads),
            head_dim=_size(hf, "head_dim", source, default=hidden // heads),
            rms_norm_eps=_number(hf.get("rms_norm_eps", 1e-6), float, "rms_norm_eps", source),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
            max_position_embeddings=_number(
                hf.get("max_position_embeddings", 4096), int, "max_position_embeddings", source
            ),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=decoder == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            o_bias=decoder != "Qwen2ForCausalLM" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_sliding_window(hf, decoder, source),
            architecture=architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            num_labels=_num_labels(hf, source) if decoder != architecture else None,
        )

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES
    ) -> ModelConfig:
        path = os.path.join(os.fspath(folder), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no config.json in the model folder")
        return cls.from_json_file(path, architectures)

    @classmethod
    def from_json_file(
        cls, path: str | os.PathLike, architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES
    ) -> ModelConfig:
        """The architecture a config.json file describes (a JSON error names the file)."""
        with open(path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as err:
                raise UnsupportedModelError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(hf, dict):
            raise UnsupportedModelError(f"{path}: expected a JSON object, got {type(hf).__name__}")
        return cls.from_hf_dict(hf, source=os.fspath(path), architectures=architectures)

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json that transformers reads back as the same architecture."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope.update(self.rope_parameters)
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.decoder_architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
        }
        if self.decoder_architecture == "Qwen2ForCausalLM":
            hf.update(use_sliding_window=False, sliding_window=None)
        else:
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.decoder_architecture == "MistralForCausalLM":
            hf["sliding_window"] = self.sliding_window
        if self.num_labels is not None:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        return hf


def _architecture_from_model_type(model_type: str | None, source: str) -> str:
    for architecture, name in _MODEL_TYPES.items():
        if name == model_type:
            return architecture
    raise UnsupportedModelError(
        f"{source}: no 'architectures' entry and model_type {model_type!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _num_labels(hf: Mapping[str, Any], source: str) -> int:
    """A classifier's label count as transformers reads it: id2label's length, else num_labels, else 2."""
    return len(hf["id2label"]) if hf.get("id2label") else _number(hf.get("num_labels", 2), int, "num_labels", source)


def _size(hf: Mapping[str, Any], field: str, source: str, default: int | None = None) -> int:
    """A size of the model: a positive integer; ``default`` when the field is absent or null (else it is required)."""
    value = hf.get(field)
    if value is None:
        if default is None:
            raise UnsupportedModelError(f"{source}: field {field!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
    return value


def _number(value: Any, kind: type, field: str, source: str) -> Any:
    """``kind(value)`` (int or float) of a config.json field; a value that is no such number names the field."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"{source}: field {field!r} must be {kind.__name__}, got {value!r}") from None


def _sliding_window(hf: Mapping[str, Any], architecture: str, source: str) -> int | None:
    """Mistral applies its window to every layer; Qwen2's per-layer windows are not supported."""
    if architecture == "Qwen2ForCausalLM":
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
        return None
    if architecture == "LlamaForCausalLM":
        return None
    window = hf.get("sliding_window")
    return _number(window, int, "sliding_window", source) if window else None
