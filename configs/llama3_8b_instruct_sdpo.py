"""sDPO of Llama-3-8B-Instruct with the paper's two stages (OpenOrca pairs, then UltraFeedback).

    sdpo-train --config configs/llama3_8b_instruct_sdpo.py:v4-32    (TPU v4-32: 16 chips x 32 GiB, FSDP 16)
    sdpo-train --config configs/llama3_8b_instruct_sdpo.py:8xh100   (one node of 8 H100 80 GB, FSDP 8)
    sdpo-plan  --config configs/llama3_8b_instruct_sdpo.py:v4-32

meta-llama/Meta-Llama-3-8B-Instruct is gated on the hub: download it once (or set `model.path` to a
local folder); its architecture is in configs/model_shapes/ so sdpo-plan needs no download. Data,
stage order and DPO values: configs/sdpo_recipe.py. Memory: the 128k vocabulary makes the output
layer large (525M weights: 2.1 GB float32, gathered over FSDP for the log-probs), so micro-batches
are smaller on the 32 GiB v4 chips: 4 of 32 pairs on v4-32 (4 sequences per chip), 2 of 64 on
8 GPUs (16 sequences per GPU); remat full, bfloat16 compute, precomputed reference log-probs.
"""

from configs import default, sdpo_recipe

# target: (mesh data, fsdp, tensor, grad_accum)
TARGETS = {"v4-32": (1, 16, 1, 4), "8xh100": (1, 8, 1, 2)}


def get_config(target: str = "8xh100"):
    c = sdpo_recipe.apply_recipe(default.get_config())
    c.output_dir = f"runs/llama3_8b_instruct_sdpo_{target}"
    c.model.path = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.model.shape_config = f"{sdpo_recipe.SHAPES}/Meta-Llama-3-8B-Instruct"
    return sdpo_recipe.apply_target(c, target, TARGETS)
