"""A one-minute smoke run: the embedded default's pipeline on a tiny random model.

    sdpo-train --config configs/tiny.py

Everything is real except the model's knowledge: `tiny-random-llama` is a 2-layer random Llama
written once as a Hugging Face folder (sdpo_jax.models.tiny), with the shipped Llama tokenizer
and a chat template, so the data path (chat templates, shared-prefix transcripts), the
easy-to-hard partition, reference precompute, checkpoints, eval, generation and the report all
run as in a real job. Use it to check an install, a launch script or a code change; its metrics
mean nothing.
"""

import ml_collections

from configs.default import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.output_dir = "runs/tiny"
    c.model.path = "tiny-random-llama"
    c.data.limit = 16
    c.data.max_length = 128
    c.data.max_prompt_length = 96
    c.data.length_buckets = (128,)
    c.data.eval_fraction = 0.125
    c.train.learning_rate = 1e-3
    c.eval.max_new_tokens = 16
    c.checkpoint.every_steps = 4
    return c
