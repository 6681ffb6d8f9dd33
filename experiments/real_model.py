"""Stepwise DPO on a real model: SmolLM2-135M-Instruct learns to name the largest number of a list.

    python -m experiments.real_model [--seeds 0 1 2] [--out runs/experiments/real_model] [--publish]
    python -m experiments.real_model --quick --model PATH     # a smoke run (tiny sizes, not a result)

M0 is the shipped default model (configs/default.py's model.path). The task and its exact reward are
experiments.largest (difficulty = list length). Per seed:

1. problems: training prompts, held-out pair prompts and a balanced held-out test set (``test_per_length``
   lists of every length), all drawn from the seed;
2. offline pairs: ``samples`` answers of M0 per prompt at temperature 1; a prompt gives a pair when some
   sample is wrong: chosen = the gold answer ("The largest number in this list is 57."), rejected = the
   first wrong, non-empty sample (like the paper's data: chosen from a stronger source, rejected from
   the model); M0's sample accuracy on the prompt (correct samples / samples) is its difficulty;
3. variants, each through the stage driver `sdpo_jax.stages.train`, from M0, with the same total
   number of optimizer steps (``epochs`` passes over the pairs, split over the stages):
       dpo          T = 1, all pairs (plain DPO)
       random-2     sDPO, a seeded random split
       easy-2       sDPO easy-to-hard by M0's accuracy: pairs sorted by M0's sample accuracy on their
                    prompt (highest first; then shorter lists; then a seeded order), cut in two
       onpolicy-2   random-2's prompts, but each stage's pairs are built as in 2. from M(t-1)'s own samples
                    (sdpo.stage_data=generated, generate.chosen=gold, scored by experiments.largest:score)
4. measures of M0 and every stage's model M_t: exact accuracy of greedy answers on the test set, by
   length (experiments.real_model_eval); held-out preference accuracy on the held-out pairs (the
   driver's eval_after, reference M0); gamma_t (the driver's ref_logratio_mean); ARC-Easy accuracy of
   M0 and of each variant's final model (what the alignment costs in general ability).

Results: OUT/seed_<s>/m0.json and OUT/seed_<s>/<variant>.json, each written when done, so a rerun
resumes (a variant whose stage-driver run was cut off resumes inside the driver too); OUT/summary.json
and OUT/table.md over seeds. ``--publish`` also writes experiments/results/real_model.json (refused
unless every seed was made at HEAD from a clean tree). It runs unchanged on a GPU or TPU (the device is
recorded in each result's provenance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from configs.default import get_config
from experiments.largest import Problem, problems_per_length, reward, sample_problems
from experiments.measure import stage_params
from experiments.provenance import provenance, publish
from experiments.real_model_eval import ArcEasy, answers, exact_accuracy
from experiments.real_model_summary import markdown_table, summarize
from experiments.runtime import start_experiment
from sdpo_jax.models.loading import load_model, load_tokenizer
from sdpo_jax.partition import chunk_sizes
from sdpo_jax.stages import train

PROGRAM = "python -m experiments.real_model"
PUBLISHED = Path(__file__).resolve().parent / "results" / "real_model.json"
#: M0's ARC-Easy metrics, measured once per output folder (nothing in them is random) and shared by its seeds.
M0_ARC_EASY = "m0_arc_easy.json"
VARIANTS = ("dpo", "random-2", "easy-2", "onpolicy-2")


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = get_config().model.path
    dtype: str = "bfloat16"
    lengths: tuple[int, int] = (3, 8)  # list lengths, inclusive
    train_prompts: int = 288
    eval_pair_prompts: int = 64
    test_per_length: int = 30
    samples: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 16
    batch_size: int = 8
    learning_rate: float = 3e-6
    beta: float = 0.1
    epochs: float = 1.0
    warmup_ratio: float = 0.1
    max_length: int = 96  # prompts are 49-71 tokens (chat template included), answers at most max_new_tokens + 2
    arc_limit: int = 0  # ARC-Easy questions (0 = all 570)


QUICK_SIZES = dict(
    lengths=(3, 4),
    train_prompts=16,
    eval_pair_prompts=8,
    test_per_length=4,
    samples=2,
    max_new_tokens=12,  # "The largest number in this list is 57." is 11 tokens
    batch_size=4,
    arc_limit=8,
)


@dataclasses.dataclass(frozen=True)
class Pair:
    problem: Problem
    rejected: str
    m0_accuracy: float  # M0's sample accuracy on this prompt

    def row(self) -> dict:
        return {
            "prompt": [{"role": "user", "content": self.problem.question}],
            "chosen": [{"role": "assistant", "content": self.problem.gold}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def seed_problems(seed: int, s: Settings) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(training, held-out pair, test) problems of a seed, always drawn in this order."""
    rng = np.random.default_rng([seed, 3])
    return (
        sample_problems(rng, s.train_prompts, s.lengths),
        sample_problems(rng, s.eval_pair_prompts, s.lengths),
        problems_per_length(rng, s.test_per_length, s.lengths),
    )


def offline_pairs(model, params, tokenizer, problems: list[Problem], s: Settings, seed: int) -> list[Pair]:
    """The pairs of step 2 of the module docstring, from ``s.samples`` M0 answers per problem."""
    repeated = [p for p in problems for _ in range(s.samples)]
    texts = answers(model, params, tokenizer, repeated, s.max_new_tokens, temperature=s.temperature, seed=seed)
    pairs = []
    for i, problem in enumerate(problems):
        group = texts[i * s.samples : (i + 1) * s.samples]
        rewards = [reward(problem, t) for t in group]
        wrong = [t for t, r in zip(group, rewards) if r == 0.0 and t.strip()]
        if wrong:
            pairs.append(Pair(problem, wrong[0], float(np.mean(rewards))))
    return pairs


def easy_to_hard(pairs: list[Pair], num_stages: int, seed: int) -> list[list[Pair]]:
    """T chunks: M0's sample accuracy highest first, then shorter lists, then a seeded random order."""
    tiebreak = np.random.default_rng([seed, 4]).permutation(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i].m0_accuracy, pairs[i].problem.difficulty, tiebreak[i]))
    bounds = np.cumsum([0] + chunk_sizes(len(pairs), num_stages))
    return [[pairs[i] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def write_jsonl(path: Path, pairs: list[Pair]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row()) + "\n" for p in pairs), encoding="utf-8")
    return str(path)


def length_buckets(s: Settings) -> tuple[int, int, int]:
    """``data.length_buckets`` of the pairs: (completion bucket, max_length, longest packed pair), multiples of 8.

    With prefix sharing a batch is [rows, L] (prompt + chosen + rejected, L the smallest bucket holding its
    longest pair) and its log-prob head reads [rows, K] positions per side (K the smallest bucket holding its
    longest completion; sdpo_jax.data.batching). A completion here is at most max_new_tokens + 2 tokens (the
    end-of-turn tokens) and a prompt at most max_prompt_length, so K = the first bucket and L = one of the other
    two: never more padding than one bucket step, and at most two shapes per compiled step (a single bucket of
    max_length made K = 96 and sent a fifth of the pairs to a doubled L of 192; seed 0's dpo stage took
    155.7 s in the stage driver then, 110.8 s with these buckets).
    """
    completion = s.max_new_tokens + 2
    packed = max_prompt_length(s) + 2 * completion
    return tuple(-(-n // 8) * 8 for n in (completion, s.max_length, packed))


def max_prompt_length(s: Settings) -> int:
    """The prompt budget: max_length less an answer and room for the end-of-turn tokens."""
    return s.max_length - s.max_new_tokens - 4


def variant_config(name: str, s: Settings, files: dict, num_pairs: int, out: Path, seed: int):
    """The stage-driver config of variant ``name`` (configs/default.py with the experiment's settings)."""
    stages = 1 if name == "dpo" else 2
    c = get_config()
    c.output_dir = str(out / "runs" / name)
    c.model.path = s.model
    c.model.dtype = s.dtype
    c.data.train = tuple(files["easy"]) if name == "easy-2" else (files["all"],)
    c.data.eval = (files["eval"],)
    c.data.limit = 0
    c.data.skip_invalid = False
    c.data.eval_fraction = 0.0
    c.data.max_length = s.max_length
    c.data.max_prompt_length = max_prompt_length(s)
    c.data.length_buckets = length_buckets(s)
    c.data.cache_dir = str(out / "cache")
    c.sdpo.num_stages = stages
    c.sdpo.partition = "datasets" if name == "easy-2" else "random"
    c.sdpo.stage_data = "generated" if name == "onpolicy-2" else "offline"
    c.generate.scorer = "experiments.largest:score"
    c.generate.samples_per_prompt = s.samples
    c.generate.temperature = s.temperature
    c.generate.max_new_tokens = s.max_new_tokens
    c.generate.chosen = "gold"
    c.generate.batch_size = 32
    c.train.batch_size = s.batch_size
    c.train.steps_per_stage = max(1, math.ceil(s.epochs * num_pairs / stages / s.batch_size))
    c.train.seed = seed
    c.train.learning_rate = s.learning_rate
    c.train.warmup_ratio = s.warmup_ratio
    c.train.log_every = 1000
    c.dpo.beta = s.beta
    c.eval.prompts = ()  # answers are scored by this experiment, not printed
    c.eval.choices = ""  # ARC-Easy is measured here, once per model
    c.log.progress = "never"
    c.log.tensorboard = False
    c.checkpoint.every_steps = 25  # a cut-off run resumes close to where it stopped
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    return c


class Seed:
    """One seed's M0, data and measures; ``m0()`` and ``variant(name)`` each cache their result as JSON in ``out``.

    M0's ARC-Easy accuracy has nothing random in it, so it is measured once for all seeds and cached in
    ``shared`` (the folder above the seeds' folders).
    """

    def __init__(self, seed: int, out: Path, s: Settings, shared: Path, log=print):
        self.seed, self.out, self.s, self.shared, self.log = seed, out, s, shared, log
        model_config = get_config().model
        model_config.path, model_config.dtype = s.model, s.dtype
        self.model, self.params, folder = load_model(model_config)
        self.tokenizer = load_tokenizer(folder)
        self.train_problems, self.eval_problems, self.test = seed_problems(seed, s)
        self.arc = ArcEasy(self.model, self.tokenizer, s.arc_limit)

    def _cached(self, name: str, build) -> dict:
        return cached_result(self.out / f"{name}.json", self.s, lambda: {"seed": self.seed, **build()})

    def m0_arc_easy(self) -> dict:
        """M0's ARC-Easy metrics, from ``shared``/m0_arc_easy.json when an earlier seed measured them."""
        return cached_result(self.shared / M0_ARC_EASY, self.s, lambda: {"arc_easy": self.arc(self.params)})["arc_easy"]

    def m0(self) -> dict:
        """M0's measures and the pair files (rebuilt from the seed when missing: the sampling is seeded)."""
        return self._cached("m0", self._build_m0)

    def _build_m0(self) -> dict:
        s = self.s
        pairs = offline_pairs(self.model, self.params, self.tokenizer, self.train_problems, s, self.seed)
        eval_pairs = offline_pairs(self.model, self.params, self.tokenizer, self.eval_problems, s, self.seed + 1000)
        data = self.out / "data"
        write_jsonl(data / "train_all.jsonl", pairs)
        write_jsonl(data / "eval.jsonl", eval_pairs)
        for k, chunk in enumerate(easy_to_hard(pairs, 2, self.seed)):
            write_jsonl(data / f"train_easy_stage{k + 1}.jsonl", chunk)
        quality = exact_accuracy(self.model, self.params, self.tokenizer, self.test, s.max_new_tokens)
        result = {
            "m0": {**quality, "arc_easy": self.m0_arc_easy()},
            "pairs": describe(pairs, self.train_problems, s.samples),
            "eval_pairs": describe(eval_pairs, self.eval_problems, s.samples),
        }
        self.log(
            f"seed {self.seed}: M0 accuracy {quality['accuracy']:.3f}, ARC-Easy {result['m0']['arc_easy']['acc']:.3f}; "
            f"{len(pairs)} train pairs, {len(eval_pairs)} held-out pairs"
        )
        return result

    def variant(self, name: str) -> dict:
        m0 = self.m0()  # the data files exist from here on
        data = self.out / "data"
        files = {
            "all": str(data / "train_all.jsonl"),
            "eval": str(data / "eval.jsonl"),
            "easy": [str(data / f"train_easy_stage{k}.jsonl") for k in (1, 2)],
        }
        return self._cached(name, lambda: self._train(name, files, m0["pairs"]["num_pairs"]))

    def _train(self, name: str, files: dict, num_pairs: int) -> dict:
        config = variant_config(name, self.s, files, num_pairs, self.out, self.seed)
        report = train(config)
        stages = []
        snapshots = stage_params(self.model, Path(config.output_dir))
        for entry, params in zip(report, snapshots):
            stage = {
                "stage": entry["stage"],
                "num_pairs": entry["num_pairs"],
                "steps": entry["steps"],
                "gamma": entry["ref_logratio_mean"],
                "eval_accuracy": entry["eval_after"]["rewards/accuracies"],
                "eval_margin": entry["eval_after"]["rewards/margins"],
                **exact_accuracy(self.model, params, self.tokenizer, self.test, self.s.max_new_tokens),
            }
            if "generated" in entry:
                stage["generated"] = {k: entry["generated"][k] for k in ("prompts", "pairs") if k in entry["generated"]}
            stages.append(stage)
        stages[-1]["arc_easy"] = self.arc(snapshots[-1])
        self.log(
            f"seed {self.seed} {name}: accuracy "
            + " -> ".join(f"{st['accuracy']:.3f}" for st in stages)
            + ", gamma "
            + " -> ".join(f"{st['gamma']:.2f}" for st in stages)
            + f", ARC-Easy {stages[-1]['arc_easy']['acc']:.3f}"
        )
        return {"stages": stages}


def cached_result(path: Path, s: Settings, build) -> dict:
    """The JSON result at ``path`` when it was made with settings ``s``; else ``build()`` with the settings, its
    provenance and its seconds, written there. One made with other settings stops the run (SystemExit)."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["settings"] != settings_record(s):
            raise SystemExit(f"{path}: made with other settings than this command's; use another --out or delete it")
        return stored
    started = time.perf_counter()
    result = {"settings": settings_record(s), "provenance": provenance(PROGRAM), **build()}
    result["seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def describe(pairs: list[Pair], problems: list[Problem], samples: int) -> dict:
    """Counts for the write-up: prompts, pairs, M0's mean sample accuracy on all prompts and on the paired ones."""
    return {
        "num_prompts": len(problems),
        "num_pairs": len(pairs),
        "mean_difficulty": float(np.mean([p.problem.difficulty for p in pairs])) if pairs else 0.0,
        "m0_sample_accuracy_paired": float(np.mean([p.m0_accuracy for p in pairs])) if pairs else 0.0,
        "samples": samples,
    }


def settings_record(s: Settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(s)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/real_model"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--model", help=f"M0: an HF folder, .gguf or named model (default {Settings.model})")
    parser.add_argument("--learning-rate", type=float, help=f"peak learning rate (default {Settings.learning_rate})")
    parser.add_argument("--beta", type=float, help=f"DPO beta (default {Settings.beta})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a result")
    parser.add_argument("--publish", action="store_true", help=f"also write the committed results ({PUBLISHED.name})")
    parser.add_argument("--results", type=Path, default=PUBLISHED, help="the committed results file (--publish)")
    args = parser.parse_args(argv)
    if min(args.seeds) < 0:
        parser.error("--seeds must be >= 0")
    overrides = {
        k: v
        for k, v in (("model", args.model), ("learning_rate", args.learning_rate), ("beta", args.beta))
        if v is not None
    }
    settings = dataclasses.replace(Settings(), **(QUICK_SIZES if args.quick else {}), **overrides)
    start_experiment(args.out)
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        run = Seed(seed, args.out / f"seed_{seed}", settings, args.out)
        results.append({"seed": seed, "m0": run.m0(), "variants": {name: run.variant(name) for name in args.variants}})
    summary = summarize(results, list(args.variants))
    summary["settings"] = settings_record(settings)
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(summary)
    (args.out / "table.md").write_text(table)
    print(table)
    print(f"wall time {summary['wall_seconds_this_invocation']:.0f} s; {args.out / 'summary.json'}")
    if args.publish:
        records = {f"seed {r['seed']} m0": r["m0"] for r in results}
        records |= {f"seed {r['seed']} {name}": v for r in results for name, v in r["variants"].items()}
        arc = args.out / M0_ARC_EASY
        if arc.is_file():  # the seeds' m0 records took M0's ARC-Easy from it
            records[str(arc)] = json.loads(arc.read_text())
        publish(args.results, {"variants": args.variants, "seeds": results, "summary": summary}, records, PROGRAM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
