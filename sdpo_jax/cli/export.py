"""sdpo-export: the aligned model of a stage as a Hugging Face checkpoint.

    sdpo-export --run OUTPUT_DIR [--stage N] [--dtype float32|bfloat16|float16] --out HF_DIR

N defaults to the last finished stage. The folder (config.json, model.safetensors or shards,
generation_config.json, tokenizer files of the run's SFT model) loads with
transformers.AutoModelForCausalLM and AutoTokenizer (tested against transformers' own forward
pass); vLLM and lm-eval-harness read the same Hugging Face layout, but neither was run on an
export in this project's tests. A snapshot whose files were altered since it was saved, or
whose parameters are not finite, is refused in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo-export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--run", required=True, help="a run's output_dir")
    parser.add_argument("--stage", type=int, default=None, help="stage to export (default: the last finished one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    return parser


def run_model_path(config_path: Path) -> str:
    """The ``model.path`` of a run's config.json; a missing, damaged or foreign file is one line naming it."""
    from sdpo_jax.errors import SdpoError
    from sdpo_jax.run_log import read_json

    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a sdpo-train output_dir (no config.json)")
    config = read_json(config_path)
    model = config.get("model") if isinstance(config, dict) else None
    path = model.get("path") if isinstance(model, dict) else None
    if not isinstance(path, str):
        raise SdpoError(f"{config_path}: has no model.path (not the config.json of a sdpo-train run)")
    return path


def export(run_dir: str, out: str, stage: int | None = None, dtype: str = "float32") -> Path:
    import jax

    from sdpo_jax.checkpoint.hf_export import save_hf_checkpoint
    from sdpo_jax.checkpointing import RunCheckpoints
    from sdpo_jax.divergence import first_non_finite
    from sdpo_jax.errors import ConfigError, TrainingDiverged
    from sdpo_jax.models import LlamaForCausalLM, ModelConfig
    from sdpo_jax.models.llama import init_params
    from sdpo_jax.models.loading import resolve_model_folder

    folder = resolve_model_folder(run_model_path(Path(run_dir) / "config.json"))
    config = ModelConfig.from_pretrained(folder)
    checkpoints = RunCheckpoints(run_dir)
    finished = checkpoints.finished_stages()
    if not finished:
        raise FileNotFoundError(f"{run_dir}: no finished stage to export")
    stage = finished[-1] if stage is None else stage
    if stage not in finished:
        raise ConfigError(f"--stage {stage}: the stage is not finished in {run_dir}; finished stages: {finished}")
    abstract = jax.eval_shape(lambda: init_params(LlamaForCausalLM(config), jax.random.key(0)))
    params, _ = checkpoints.load_stage(stage, abstract)
    checkpoints.close()
    bad = first_non_finite(params)
    if bad is not None:
        raise TrainingDiverged(f"{run_dir}: stage {stage}'s parameter {bad} holds NaN or infinity; not exported")
    return Path(save_hf_checkpoint(params, config, out, dtype=dtype, source_folder=folder))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sdpo_jax.cli.errors import user_errors

    with user_errors("sdpo-export"):
        path = export(args.run, args.out, args.stage, args.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
