"""The sDPO paper's run: SOLAR-10.7B (SFT) aligned in two stages, OpenOrca pairs then UltraFeedback.

    sdpo-train --config configs/solar_10_7b_sdpo.py:v5p-32     (TPU v5p-32: 16 chips, FSDP 16)
    sdpo-train --config configs/solar_10_7b_sdpo.py:8xh100     (one node of 8 H100 80 GB, FSDP 8)
    sdpo-plan  --config configs/solar_10_7b_sdpo.py:v5p-32     (checks it fits, without weights)

Model: the paper trains "SOLAR 10.7B + SFT", which is not released. `model.path` names
upstage/SOLAR-10.7B-Instruct-v1.0 (the same architecture, configs/model_shapes/) as the stand-in;
its model card lists Intel/orca_dpo_pairs and UltraFeedback cleaned among its DPO data, so it has
seen these pairs already: point `model.path` at your own SFT folder to reproduce the paper.
Data, stage order and the DPO values (Zephyr's, which the paper says it follows): configs/sdpo_recipe.py.

Memory (sdpo-plan's table for both targets is in docs/scaling.md): bfloat16 compute with float32
master weights and AdamW moments (16 bytes per parameter, 172 GB for 10.7B), all sharded by FSDP;
every decoder layer rematerialised (remat full) so that only each layer's input is kept for the
backward pass; reference log-probs precomputed once per stage (no reference forward in the step);
on 8 GPUs the 128-pair batch is 4 micro-batches of 32 pairs.
"""

from configs import default, sdpo_recipe

# target: (mesh data, fsdp, tensor, grad_accum)
TARGETS = {"v5p-32": (1, 16, 1, 2), "8xh100": (1, 8, 1, 4)}


def get_config(target: str = "8xh100"):
    c = sdpo_recipe.apply_recipe(default.get_config())
    c.output_dir = f"runs/solar_10_7b_sdpo_{target}"
    c.model.path = "upstage/SOLAR-10.7B-Instruct-v1.0"
    c.model.shape_config = f"{sdpo_recipe.SHAPES}/SOLAR-10.7B-Instruct-v1.0"
    return sdpo_recipe.apply_target(c, target, TARGETS)
