"""What the real-model configs share: the sDPO paper's data and DPO recipe, and the target machines.

Data (Kim et al., "sDPO: Don't Use Your Data All at Once", arXiv 2403.19270): stage 1 is the
OpenOrca preference set (Intel/orca_dpo_pairs, its only split `train`, ~12.9k pairs), stage 2
UltraFeedback Cleaned (allenai/ultrafeedback_binarized_cleaned, split `train_prefs`, ~60.8k
pairs), with `test_prefs` (~2k pairs) held out for evaluation. `sdpo.partition='datasets'` runs them
in that order. The paper's v2 orders data easy-to-hard by the reference model's preference accuracy
per source and ends up with the same order (OpenOrca first); `datasets` states it directly and
saves the pass that scores both sources with the 7-11B SFT model before training starts (~74k
pairs; `easy_to_hard` would score stage 1's pairs a second time for its reference log-probs). To
let the run decide, set `--config.sdpo.partition=easy_to_hard` (difficulty `source_accuracy`).

DPO hyper-parameters: the paper says it follows Zephyr (Tunstall et al., arXiv 2310.16944).
    dpo.beta = 0.1, loss sigmoid   Zephyr-7B-beta's DPO (the alignment-handbook recipe README:
                                   "3 epochs with beta=0.1"; its later recipe uses 0.01 for 1 epoch)
    train.learning_rate = 5e-7     alignment-handbook recipes/zephyr-7b-beta/dpo/config_full.yaml
    train.lr_schedule = cosine, warmup_ratio = 0.1          same file
    train.batch_size = 128         same file: 8 GPUs x per-device 8 x gradient accumulation 2
    data.max_length 1024, data.max_prompt_length 512        same file
    one epoch per stage (train.steps_per_stage = 0)         same file (num_train_epochs: 1)
    train.weight_decay = 0.0       Zephyr report: AdamW, no weight decay
    train.max_grad_norm = 1.0      TRL's default (the recipe does not set it)
    model.dtype = bfloat16         Zephyr report: bfloat16 (here: bf16 compute, float32 master weights)
Values the paper does not state are these Zephyr ones; the paper's own SFT model is not released.

Targets (`get_config("TARGET")`, on the command line `--config configs/X.py:TARGET`): the machine's
name as `launch/tpu.sh --type` spells it (or 8xh100 for one 8-GPU node), its JAX device count and
the memory sdpo-plan budgets per device (HBM less ~5% runtime reserve on TPU; 90% of an 80 GB
H100, the XLA_PYTHON_CLIENT_MEM_FRACTION that launch/gpu.sh sets).
"""

from __future__ import annotations

import os

import ml_collections

SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_shapes")

HARDWARE = {
    # name: (platform, JAX devices, usable GiB per device, what it is)
    "v5p-32": ("tpu", 16, 90.0, "TPU v5p, 16 chips x 95 GiB HBM, 4 hosts"),
    "v4-32": ("tpu", 16, 30.0, "TPU v4, 16 chips x 32 GiB HBM, 4 hosts"),
    "v5litepod-64": ("tpu", 64, 15.0, "TPU v5e, 64 chips x 16 GiB HBM, 16 hosts"),
    "8xh100": ("gpu", 8, 72.0, "one node, 8 x H100 80 GB"),
}


def apply_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's two-stage data and the Zephyr DPO settings (see the module docstring)."""
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    # Fused attention (TPU splash, GPU cuDNN) takes only the default causal mask; prefix-shared rows
    # need a dense mask and would fall back to XLA attention with [rows, heads, L, L] scores.
    c.data.prefix_sharing = False
    c.data.train = ("Intel/orca_dpo_pairs@train", "allenai/ultrafeedback_binarized_cleaned@train_prefs")
    c.data.eval = ("allenai/ultrafeedback_binarized_cleaned@test_prefs",)
    c.data.limit = 0
    c.data.eval_fraction = 0.0
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.length_buckets = (256, 512, 1024)
    c.data.skip_invalid = True
    c.data.extra_fields = "ignore"  # UltraFeedback rows carry scores and ids next to the pair
    c.data.num_proc = 8
    c.sdpo.num_stages = 2
    c.sdpo.partition = "datasets"
    c.train.batch_size = 128
    c.train.steps_per_stage = 0
    c.train.learning_rate = 5e-7
    c.train.lr_schedule = "cosine"
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.precompute_reference = True
    c.train.log_every = 10
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"
    c.checkpoint.every_steps = 100
    return c


def apply_target(c: ml_collections.ConfigDict, target: str, settings: dict) -> ml_collections.ConfigDict:
    """Mesh and memory settings for ``target``: ``settings[target]`` = (data, fsdp, tensor, grad_accum)."""
    if target not in settings:
        raise ValueError(f"config argument {target!r} is not one of {sorted(settings)}")
    platform, devices, memory, description = HARDWARE[target]
    data, fsdp, tensor, grad_accum = settings[target]
    c.mesh = ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor, "dcn_data": 1})
    c.train.grad_accum = grad_accum
    replicas = data * fsdp  # the multiple-choice check's batches split over these devices too
    c.eval.choices_batch_size = replicas * max(1, 16 // replicas)
    c.hardware = ml_collections.ConfigDict(
        {
            "name": target,
            "platform": platform,
            "devices": devices,
            "device_memory_gib": memory,
            "description": description,
        }
    )
    return c
