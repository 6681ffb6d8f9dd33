"""sdpo-eval: score held-out preference pairs with the DPO loss, no training.

    sdpo-eval --policy HF_DIR --reference HF_DIR --data FILE [--beta 0.1]
              [--loss-type NAME[,NAME...]] [--loss-weights W[,W...]] [--label-smoothing 0.0]
              [--f-divergence-type reverse_kl] [--f-alpha-divergence-coef 0.5] [--use-weighting]
              [--ld-alpha 1.0] [--discopop-tau 0.05] [--rpo-alpha 0.0] [--batch-size N] --out FILE.json

The loss options are TRL 1.16 DPOConfig's (sdpo_jax.losses): NAME is one of sigmoid, hinge, ipo,
exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft,
sigmoid_norm; several names add up, weighted by --loss-weights (e.g. MPO: sigmoid,bco_pair,sft).
The whole file is scored as one batch (aot sorts all pairs, sft averages all chosen tokens), so the
result does not depend on --batch-size.

FILE holds text or conversational pairs (tokenized with the policy folder's tokenizer and chat
template) or pre-tokenized pairs (prompt_ids/chosen_ids/rejected_ids, used as they are). The
JSON holds the means over pairs of loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (TRL DPOTrainer definitions) and num_pairs.
Bad input: one line on stderr naming the file, line and field, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdpo_jax.losses import DPOSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--policy", required=True, help="Hugging Face folder of the policy model")
    parser.add_argument("--reference", required=True, help="Hugging Face folder of the reference model")
    parser.add_argument("--data", required=True, help="pairs: .jsonl/.json/.parquet[.gz] file or dataset name")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="sigmoid", help="a loss type or a comma list of them (default sigmoid)")
    parser.add_argument("--loss-weights", default="", help="comma list, one weight per loss type (default all 1.0)")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument(
        "--f-divergence-type",
        default="reverse_kl",
        help="reverse_kl | forward_kl | js_divergence | alpha_divergence (f-DPO)",
    )
    parser.add_argument("--f-alpha-divergence-coef", type=float, default=0.5)
    parser.add_argument("--use-weighting", action="store_true", help="WPO pair weights")
    parser.add_argument(
        "--ld-alpha", type=float, default=1.0, help="LD-DPO weight of tokens beyond the shared length (1: off)"
    )
    parser.add_argument("--discopop-tau", type=float, default=0.05)
    parser.add_argument("--rpo-alpha", type=float, default=0.0, help="weight of the chosen NLL added to the loss (RPO)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=1024, help="truncate prompt+completion to this many tokens")
    parser.add_argument(
        "--max-prompt-length", type=int, default=512, help="truncate prompts to this many tokens (0: off)"
    )
    parser.add_argument("--limit", type=int, default=0, help="score only the first N rows of the file (0: all)")
    parser.add_argument(
        "--skip-invalid", action="store_true", help="skip invalid rows (counts are reported) instead of failing"
    )
    parser.add_argument("--out", required=True, help="where to write the JSON metrics")
    return parser


def settings_from_args(args: argparse.Namespace) -> DPOSettings:
    """The DPOSettings of the command line (a bad combination is a ConfigError naming dpo.<field>)."""
    from sdpo_jax.losses import DPOSettings

    return DPOSettings(
        beta=args.beta,
        loss_type=args.loss_type,
        loss_weights=args.loss_weights,
        label_smoothing=args.label_smoothing,
        rpo_alpha=args.rpo_alpha,
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        use_weighting=args.use_weighting,
        ld_alpha=args.ld_alpha,
        discopop_tau=args.discopop_tau,
    )


def check_args(args: argparse.Namespace) -> None:
    """The model folders exist and the sizes are usable; else one line naming the option."""
    from sdpo_jax.errors import ConfigError

    for folder in (args.policy, args.reference):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such model folder")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_length < 2:
        raise ConfigError(f"--max-length must be >= 2, got {args.max_length}")


def run(args: argparse.Namespace, settings: DPOSettings) -> dict:
    import optax

    from sdpo_jax.checkpoint.hf_import import CheckpointError, load_hf_checkpoint
    from sdpo_jax.data.batching import PairBatcher, resolve_buckets
    from sdpo_jax.data.config import get_data_config
    from sdpo_jax.data.load import load_pairs
    from sdpo_jax.errors import ConfigError
    from sdpo_jax.evaluation import evaluate_pairs, jit_eval_step
    from sdpo_jax.models import LlamaForCausalLM
    from sdpo_jax.models.loading import load_tokenizer
    from sdpo_jax.placement import place, state_shardings
    from sdpo_jax.sharding import build_mesh

    config, params = load_hf_checkpoint(args.policy)
    ref_config, ref_params = load_hf_checkpoint(args.reference)
    if ref_config != config:
        raise CheckpointError(
            f"{args.reference}: the reference's architecture differs from the policy's ({args.policy})"
        )
    data_config = get_data_config()
    data_config.max_length, data_config.max_prompt_length = args.max_length, args.max_prompt_length
    data_config.skip_invalid, data_config.limit = args.skip_invalid, args.limit
    tokenizer = load_tokenizer(args.policy)
    pairs = load_pairs([args.data], tokenizer, data_config, vocab_size=config.vocab_size)
    mesh = build_mesh(data=-1)
    if args.batch_size % mesh.size:
        raise ConfigError(f"--batch-size {args.batch_size} must be a multiple of the {mesh.size} devices")
    model = LlamaForCausalLM(config)
    shardings, _ = state_shardings(model, optax.identity(), mesh)
    batcher = PairBatcher(pairs, args.batch_size, seed=0, buckets=resolve_buckets((), args.max_length), shuffle=False)
    step = jit_eval_step(model, settings, mesh, shardings.params, with_reference_params=True)
    return evaluate_pairs(
        step,
        place(params, shardings.params),
        place(ref_params, shardings.params),
        batcher.epoch_batches(0),
        settings,
        mesh,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sdpo_jax.cli.errors import user_errors
    from sdpo_jax.cli.results import write_result

    with user_errors("sdpo-eval"):
        check_args(args)
        metrics = run(args, settings_from_args(args))
        write_result(args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
