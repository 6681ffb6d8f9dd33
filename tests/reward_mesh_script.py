"""Score pairs with a reward model on one CPU device and on 4-device meshes.

Invoked by tests/test_reward_model.py in a subprocess (the device count must be set before jax is
imported); argv[1] is the reward-model folder. Prints one JSON line: {"single": rewards,
mesh_name: {"rewards": rewards, "laid_out_as_training": whether every decoder parameter has the
sharding the training params get on that mesh}}.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from sdpo_jax.models.llama import LlamaForCausalLM, logical_axes  # noqa: E402
from sdpo_jax.reward_scorer import RewardModelScorer  # noqa: E402
from sdpo_jax.sharding import build_mesh, logical_to_shardings  # noqa: E402

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Name a colour.",
    "Count to five.",
    "Why is the sky blue?",
    "Say no.",
]
COMPLETIONS = ["Hello!", "Paris.", "Blue", "1 2 3 4 5", "Light scatters off the air, blue the most.", "No."]


def laid_out_as_training(scorer: RewardModelScorer, mesh) -> bool:
    """Whether each decoder parameter's sharding is the one a causal LM's training params get on ``mesh``."""
    config = scorer.module.config
    causal = dataclasses.replace(
        config, architecture=config.decoder_architecture, num_labels=None, tie_word_embeddings=True
    )
    training = logical_to_shardings(logical_axes(LlamaForCausalLM(causal)), mesh)  # a tied causal LM: no lm_head
    decoder = {name: leaf for name, leaf in scorer.params.items() if name != "score"}
    same = jax.tree_util.tree_map(
        lambda leaf, sharding: leaf.sharding.is_equivalent_to(sharding, leaf.ndim), decoder, training
    )
    return all(jax.tree_util.tree_leaves(same))


def main(folder: str) -> None:
    report = {"single": RewardModelScorer(folder, batch_size=8)(PROMPTS, COMPLETIONS, [None] * len(PROMPTS))}
    for data, fsdp, tensor in [(2, 2, 1), (1, 2, 2)]:
        mesh = build_mesh(data, fsdp, tensor)
        scorer = RewardModelScorer(folder, mesh=mesh, batch_size=8)
        report[f"{data}x{fsdp}x{tensor}"] = {
            "rewards": scorer(PROMPTS, COMPLETIONS, [None] * len(PROMPTS)),
            "laid_out_as_training": laid_out_as_training(scorer, mesh),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
