"""Reward models: the Llama-family decoder with a sequence-classification ``score`` head.

Open reward models are Hugging Face ``*ForSequenceClassification`` checkpoints (Llama, Mistral,
Qwen2): the causal LM's decoder (``model.*``) and a linear ``score`` head [num_labels, hidden]
without bias in place of ``lm_head``. For a sequence x with final normalised hidden states h,

    reward(x) = h[last] @ score        last = the last position whose attention mask is set

(left or right padding alike). transformers takes the last token that differs from pad_token_id
instead, which is the same token unless the text itself ends in the pad token.

`LlamaForSequenceClassification` runs `LlamaForCausalLM`'s decoder in its own scope, so its
parameters are named exactly as a causal LM's (``embed_tokens``, ``layers``, ``norm``) plus
``score`` [hidden, num_labels]; it has no ``lm_head``, tied or not.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import Mesh

from sdpo_jax.checkpoint.hf_import import CheckpointError
from sdpo_jax.models.config import SEQUENCE_CLASSIFIERS, ModelConfig
from sdpo_jax.models.llama import LlamaForCausalLM, _param
from sdpo_jax.models.loading import load_params
from sdpo_jax.sharding import batch_sharding

REWARD_ARCHITECTURES = tuple(SEQUENCE_CLASSIFIERS)


class LlamaForSequenceClassification(nn.Module):
    """``__call__(input_ids [B, S], attention_mask [B, S] = all ones)`` -> float32 [B, num_labels]:
    the score head at each row's last real token (see the module docstring). The fields are
    `LlamaForCausalLM`'s."""

    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"
    remat: str = "none"
    activation_sharding: Any = None

    def setup(self):
        self.decoder = LlamaForCausalLM(
            self.config,
            self.dtype,
            self.param_dtype,
            self.attention_implementation,
            self.remat,
            self.activation_sharding,
        )
        nn.share_scope(self, self.decoder)  # the decoder's parameters at the top level, named as a causal LM's
        self.score = _param(self, "score", (self.config.hidden_size, self.config.num_labels), ("embed", "labels"))

    def __call__(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
        hidden = self.decoder(input_ids, attention_mask, return_hidden=True)
        last = jnp.argmax(jnp.arange(input_ids.shape[1]) * attention_mask, axis=-1)
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return jnp.einsum("bd,dl->bl", final, self.score.astype(self.dtype), preferred_element_type=jnp.float32)


def reward_model_config(folder: str | os.PathLike) -> ModelConfig:
    """The architecture of a reward-model folder: a ``*ForSequenceClassification`` config.json with
    one label; anything else is refused in one line naming the folder."""
    config = ModelConfig.from_pretrained(folder, architectures=REWARD_ARCHITECTURES)
    if config.num_labels != 1:
        raise CheckpointError(
            f"{os.fspath(folder)}: config.json gives the score head {config.num_labels} labels; "
            f"a reward model has exactly one"
        )
    return config


def load_reward_model(
    folder: str | os.PathLike, mesh: Mesh | None = None
) -> tuple[LlamaForSequenceClassification, dict]:
    """(module, float32 params) of a reward-model folder, float32 compute; on ``mesh`` the params are
    laid out as the training params are and every layer's activations split by rows over its batch axes."""
    config = reward_model_config(folder)
    module = LlamaForSequenceClassification(config, activation_sharding=None if mesh is None else batch_sharding(mesh))
    return module, load_params(module, folder, config, mesh)
