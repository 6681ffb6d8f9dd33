"""Where the tests' data files live: all inside the repository (tests/data/ and the package's shipped
samples and assets), so a clone anywhere runs the suite with nothing beside it."""

from __future__ import annotations

from pathlib import Path

import sdpo_jax

TEST_DATA = Path(__file__).resolve().parent / "data"
PACKAGE = Path(sdpo_jax.__file__).resolve().parent
SAMPLES = PACKAGE / "data" / "samples"

# A tokenizer folder's two files by name: tokenizer.json and tokenizer_config.json.
TOKENIZER_FILES = {
    "llama": (
        PACKAGE / "models" / "assets" / "llama_tokenizer" / "tokenizer.json",
        TEST_DATA / "tokenizers" / "llama" / "tokenizer_config.json",
    ),
    "gpt2": (
        TEST_DATA / "tokenizers" / "gpt2" / "tokenizer.json",
        TEST_DATA / "tokenizers" / "gpt2" / "tokenizer_config.json",
    ),
}
ARC_EASY = SAMPLES / "arc_easy" / "validation.json"
OPENBOOKQA = TEST_DATA / "eval" / "openbookqa" / "openbookqa.jsonl"
ORCA_PAIRS = SAMPLES / "orca_dpo_pairs" / "validation-100.jsonl"
