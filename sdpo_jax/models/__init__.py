"""Flax models of the Llama family (Llama 2/3, Mistral, Qwen2, SOLAR) and their configs."""

from sdpo_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from sdpo_jax.models.llama import LlamaForCausalLM

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "UnsupportedModelError", "LlamaForCausalLM"]
