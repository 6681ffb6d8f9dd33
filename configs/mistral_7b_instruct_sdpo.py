"""sDPO of Mistral-7B-Instruct-v0.2 with the paper's two stages (OpenOrca pairs, then UltraFeedback).

    sdpo-train --config configs/mistral_7b_instruct_sdpo.py:v5litepod-64  (TPU v5e-64: 64 chips x 16 GiB, FSDP 64)
    sdpo-train --config configs/mistral_7b_instruct_sdpo.py:8xh100        (one node of 8 H100 80 GB, FSDP 8)
    sdpo-plan  --config configs/mistral_7b_instruct_sdpo.py:v5litepod-64

v0.2 has no sliding window (config.json: sliding_window null) and RoPE theta 1e6. Its chat template
accepts only alternating user/assistant turns, and Intel/orca_dpo_pairs rows carry a system
prompt: if the template refuses them, those pairs are skipped and counted (data.skip_invalid).
Data, stage order and DPO values: configs/sdpo_recipe.py. Memory: on 16 GiB v5e chips everything is
sharded 64 ways (FSDP 64: 1.8 GB of float32 state per chip), one micro-batch of 128 pairs =
4 sequences per chip (2 micro-batches of 64 pairs on 8 GPUs); remat full, bfloat16 compute, precomputed
reference log-probs.
"""

from configs import default, sdpo_recipe

# target: (mesh data, fsdp, tensor, grad_accum)
TARGETS = {"v5litepod-64": (1, 64, 1, 1), "8xh100": (1, 8, 1, 2)}


def get_config(target: str = "8xh100"):
    c = sdpo_recipe.apply_recipe(default.get_config())
    c.output_dir = f"runs/mistral_7b_instruct_sdpo_{target}"
    c.model.path = "mistralai/Mistral-7B-Instruct-v0.2"
    c.model.shape_config = f"{sdpo_recipe.SHAPES}/Mistral-7B-Instruct-v0.2"
    return sdpo_recipe.apply_target(c, target, TARGETS)
