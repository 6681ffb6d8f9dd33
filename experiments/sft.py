"""M0: a tiny Llama trained from scratch by supervised fine-tuning on the sorting task.

Loss per batch (answer tokens only, EOS included; prompt tokens are context):

    L = - sum_rows log pi(answer | prompt) / sum_rows |answer|

Each step draws fresh problems, so the only limit on M0's quality is the number of steps: the
experiment keeps it short on purpose, so that M0 is imperfect and DPO has room to improve it.
The result is written as a Hugging Face folder (config.json, model.safetensors, tokenizer), the
form the stage driver loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.sorting import BOS_ID, EOS_ID, PAD_ID, VOCAB, Problem, build_tokenizer, sample_problems
from sdpo_jax.checkpoint.hf_export import save_hf_checkpoint
from sdpo_jax.logprobs import sequence_logps
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.llama import init_params, output_embedding
from sdpo_jax.optim import OptimizerSettings, make_optimizer


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 200
    batch_size: int = 64
    learning_rate: float = 3e-3
    lengths: tuple[int, int] = (2, 12)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=len(VOCAB),
            hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=64,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )

    @property
    def seq_len(self) -> int:
        """Longest prompt + answer: BOS, n digits, '=', n digits, EOS."""
        return 2 * self.lengths[1] + 3


def sft_batch(problems: list[Problem], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, answer mask) [B, seq_len], right-padded."""
    ids = np.full((len(problems), seq_len), PAD_ID, np.int32)
    attention = np.zeros_like(ids)
    answer = np.zeros(ids.shape, bool)
    for row, problem in enumerate(problems):
        prompt, target = problem.prompt_ids, problem.answer_ids
        ids[row, : len(prompt) + len(target)] = prompt + target
        attention[row, : len(prompt) + len(target)] = 1
        answer[row, len(prompt) : len(prompt) + len(target)] = True
    return ids, attention, answer


def train_sft(settings: SFTSettings, seed: int) -> tuple[LlamaForCausalLM, dict, list[float]]:
    """(model, params, loss per step) after ``settings.steps`` SFT steps from a seeded random init."""
    config = settings.model_config()
    model = LlamaForCausalLM(config)
    params = init_params(model, jax.random.key(seed))
    optimizer = make_optimizer(
        OptimizerSettings(
            learning_rate=settings.learning_rate,
            total_steps=settings.steps,
            warmup_steps=settings.steps // 10,
            schedule="cosine",
        )
    )
    opt_state = optimizer.init(params)

    def loss_fn(p, ids, attention, answer):
        hidden = model.apply({"params": p}, ids, attention_mask=attention, return_hidden=True)
        logps, counts = sequence_logps(hidden, output_embedding(p, config), ids, answer, chunk_size=ids.shape[1])
        return -jnp.sum(logps) / jnp.sum(counts)

    @jax.jit
    def step(p, state, ids, attention, answer):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, attention, answer)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    rng = np.random.default_rng([seed, 1])
    losses = []
    for _ in range(settings.steps):
        batch = sft_batch(sample_problems(rng, settings.batch_size, settings.lengths), settings.seq_len)
        params, opt_state, loss = step(params, opt_state, *batch)
        losses.append(float(loss))
    return model, params, losses


def save_model_folder(params, config: ModelConfig, folder: str | Path) -> Path:
    """A Hugging Face folder the stage driver can load: weights, config and the task's tokenizer."""
    save_hf_checkpoint(params, config, folder)
    build_tokenizer(folder)
    return Path(folder)
