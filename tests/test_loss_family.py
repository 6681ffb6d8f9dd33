"""Every loss type of TRL 1.16's DPOTrainer, and combinations, against TRL itself; gradients against
finite differences; sorted losses exact under gradient accumulation and sharding."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from batch_fixtures import random_pair_batch
from hf_fixtures import load_torch_model, make_hf_checkpoint
from run_fixtures import cpu_env
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.evaluation import make_eval_step, pair_set_metrics
from sdpo_jax.losses import LOSS_TYPES, METRIC_NAMES, DPOSettings, PairLogps, batch_loss_sum
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.prefix_sharing import pack_pairs
from sdpo_jax.reference import make_reference_step
from sdpo_jax.train_step import TrainState, make_train_step

# TRL DPOConfig keyword arguments; ours are the same names (tuples for lists).
CASES = {
    "sigmoid": dict(loss_type=["sigmoid"]),
    "hinge": dict(loss_type=["hinge"], beta=0.3),
    "ipo": dict(loss_type=["ipo"], beta=0.5),
    "exo_pair": dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    "nca_pair": dict(loss_type=["nca_pair"]),
    "robust": dict(loss_type=["robust"], label_smoothing=0.2),
    "bco_pair": dict(loss_type=["bco_pair"]),
    "sppo_hard": dict(loss_type=["sppo_hard"], beta=0.5),
    "aot": dict(loss_type=["aot"], label_smoothing=0.1),
    "aot_unpaired": dict(loss_type=["aot_unpaired"], beta=0.3),
    "apo_zero": dict(loss_type=["apo_zero"]),
    "apo_down": dict(loss_type=["apo_down"]),
    "discopop": dict(loss_type=["discopop"], discopop_tau=0.1),
    "sft": dict(loss_type=["sft"]),
    "sigmoid_norm": dict(loss_type=["sigmoid_norm"], beta=2.0),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "js+wpo+ld": dict(
        loss_type=["sigmoid", "ipo", "discopop"],
        loss_weights=[1.0, 0.1, 0.5],
        f_divergence_type="js_divergence",
        use_weighting=True,
        ld_alpha=0.5,
    ),
    # (TRL's discopop overflows to nan under forward_kl and alpha_divergence here: e^-z with z ~ -1e3)
    "forward_kl": dict(loss_type=["robust", "sigmoid_norm"], f_divergence_type="forward_kl", label_smoothing=0.1),
    "alpha_divergence+ld": dict(
        loss_type=["hinge", "exo_pair", "sft"],
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
        label_smoothing=1e-3,
        ld_alpha=0.7,
    ),  # sft: plain sums
    "wpo": dict(loss_type=["nca_pair", "apo_down", "sppo_hard"], use_weighting=True),
    "sorted+ld": dict(loss_type=["aot", "aot_unpaired", "bco_pair"], ld_alpha=0.0),
}


def _settings(case: dict) -> DPOSettings:
    return DPOSettings(**{name: tuple(value) if isinstance(value, list) else value for name, value in case.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_family_models")
    return make_hf_checkpoint("llama2", root / "policy", seed=0), make_hf_checkpoint(
        "llama2", root / "reference", seed=1
    )


@pytest.fixture(scope="module")
def rows():
    """12 pre-tokenized pairs; completion lengths differ within most pairs (LD-DPO has a tail to weigh)."""
    rng = np.random.default_rng(0)
    return [
        {
            "prompt_ids": rng.integers(3, 160, rng.integers(2, 12)).tolist(),
            "chosen_ids": rng.integers(3, 160, rng.integers(1, 9)).tolist() + [2],
            "rejected_ids": rng.integers(3, 160, rng.integers(1, 9)).tolist() + [2],
        }
        for _ in range(12)
    ]


def _plain_batch(rows, length=24) -> dict[str, np.ndarray]:
    """The rows right-padded as TRL's collator lays them out: prompt + completion per side."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids, attention, loss = (np.zeros((len(rows), length), dtype) for dtype in (np.int32, np.int32, bool))
        for i, row in enumerate(rows):
            prompt, sequence = len(row["prompt_ids"]), row["prompt_ids"] + row[f"{side}_ids"]
            ids[i, : len(sequence)], attention[i, : len(sequence)], loss[i, prompt : len(sequence)] = sequence, 1, True
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"] = ids, attention, loss
    return batch


@pytest.fixture(scope="module")
def ours(checkpoints, rows):
    """ours(case, layout) -> our metrics of the 12 pairs; one compiled eval step per distinct model-side setting."""
    (config, params), (_, ref_params) = (load_hf_checkpoint(folder) for folder in checkpoints)
    model = LlamaForCausalLM(config)
    plain = _plain_batch(rows)
    batches = {"plain": plain, "packed": pack_pairs(plain, 32, 10)}
    steps = {}

    def metrics(case: dict, layout: str) -> dict[str, float]:
        settings = _settings(case)
        key = (settings.ld_alpha, settings.use_weighting)  # all an eval step's outputs depend on
        if key not in steps:
            steps[key] = jax.jit(make_eval_step(model, settings, chunk_size=8))
        values = steps[key](params, ref_params, batches[layout])
        assert np.all(values.pop("valid") == 1)
        means = pair_set_metrics(values, settings)
        return {name: float(means[name]) for name in METRIC_NAMES}

    return metrics


@pytest.fixture(scope="module")
def trl_metrics(checkpoints, rows, tmp_path_factory):
    """trl_metrics(case) -> DPOTrainer.evaluate() of the 12 pairs in one batch, float32, on a trainer built for
    the case."""
    policy, reference = checkpoints
    out = tmp_path_factory.mktemp("trl")
    dataset = Dataset.from_list(rows)
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy)

    def metrics(case: dict) -> dict[str, float]:
        args = DPOConfig(
            output_dir=str(out),
            per_device_eval_batch_size=len(rows),
            bf16=False,
            report_to="none",
            use_cpu=True,
            max_length=None,
            prediction_loss_only=True,
            **case,
        )
        with pytest.MonkeyPatch.context() as patch:  # the rows are already TRL's tokenized layout
            patch.setattr(DPOTrainer, "_prepare_dataset", lambda self, data, *args, **kwargs: data)
            trainer = DPOTrainer(
                model=load_torch_model(policy),
                ref_model=load_torch_model(reference),
                args=args,
                train_dataset=dataset,
                eval_dataset=dataset,
                processing_class=tokenizer,
            )
            result = trainer.evaluate()
        return {name: result[f"eval_{name}"] for name in METRIC_NAMES}

    return metrics


@pytest.mark.parametrize("name", list(CASES))
def test_matches_trl_dpo_trainer(name, ours, trl_metrics):
    """Loss and TRL's metrics of each loss type and combination, within 1e-5 relative (float32 both;
    forward_kl's e^-u multiplies the frameworks' log-prob rounding difference by ~|u| ~ 10 here), or 1e-6
    absolute for a mean of per-pair values of order 0.1-1 that cancels to ~1e-3."""
    case = CASES[name]
    rtol = 5e-5 if case.get("f_divergence_type") == "forward_kl" else 1e-5
    expected = trl_metrics(case)
    assert abs(expected["rewards/margins"]) > 1e-2 and 0 < expected["rewards/accuracies"] < 1  # informative pairs
    layouts = ("plain", "packed") if "ld_alpha" in case or "use_weighting" in case else ("plain",)
    for layout in layouts:
        got = ours(case, layout)
        for metric in METRIC_NAMES:
            np.testing.assert_allclose(
                got[metric], expected[metric], rtol=rtol, atol=1e-6, err_msg=f"{layout} {metric}"
            )


def test_every_loss_type_is_covered():
    assert set(LOSS_TYPES) == {loss for case in CASES.values() for loss in case["loss_type"]}


def _random_logps(settings: DPOSettings, pairs: int = 7, seed: int = 0) -> PairLogps:
    """Log-ratios of a few nats (forward_kl's e^-u stays moderate), sequence log-probs of tens."""
    rng = np.random.default_rng(seed)
    policy = -rng.uniform(5, 40, (2, pairs))
    reference = policy + rng.normal(0, 2, (2, pairs))
    tokens = rng.integers(1, 20, (2, pairs)).astype(np.float64)
    return PairLogps(
        *policy,
        *reference,
        *tokens,
        policy_chosen_plain=policy[0] * 1.3 if settings.ld_weighting else None,
        log_weight=-rng.uniform(0, 3, pairs) if settings.use_weighting else None,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_matches_finite_differences(name):
    """d loss / d policy log-probs (float64) against central differences, a padding pair included."""
    settings = _settings(CASES[name])
    differentiable = ("policy_chosen", "policy_rejected") + (("policy_chosen_plain",) if settings.ld_weighting else ())
    with jax.enable_x64(True):
        logps = jax.tree_util.tree_map(jnp.asarray, _random_logps(settings))
        valid = jnp.asarray([1, 1, 1, 0, 1, 1, 1], jnp.float64)

        def loss(values):
            return batch_loss_sum(
                dataclasses.replace(logps, **values),
                valid,
                settings,
                jnp.sum(valid),
                jnp.sum(valid * logps.chosen_tokens),
            )

        point = {field: getattr(logps, field) for field in differentiable}
        grads = jax.grad(loss)(point)
        loss_at = jax.jit(loss)
        step = 1e-5
        for field in differentiable:
            for i in range(valid.shape[0]):
                up, down = ({**point, field: point[field].at[i].add(sign * step)} for sign in (1, -1))
                numeric = (loss_at(up) - loss_at(down)) / (2 * step)
                np.testing.assert_allclose(grads[field][i], numeric, rtol=1e-6, atol=1e-9, err_msg=f"{field}[{i}]")
        assert float(jnp.abs(grads["policy_chosen"][3])) == 0.0  # the padding pair
        if settings.use_weighting:  # WPO's weight is a constant of the loss, as TRL computes it under no_grad
            assert not np.any(jax.grad(lambda lw: loss({**point, "log_weight": lw}))(logps.log_weight))


def test_accumulated_sorted_loss_equals_full_batch(hf_checkpoint):
    """aot and aot_unpaired sort the whole batch: 4 micro-batches (two passes) give the full batch's loss
    and gradient, which is also the eval step's loss of those pairs; sorting each micro-batch alone would
    give another loss. The reference step precomputes the LD-weighted reference log-probs the step uses."""
    config, params = load_hf_checkpoint(hf_checkpoint("llama3"))
    model = LlamaForCausalLM(config)
    ref_params = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    batch = jax.tree_util.tree_map(jnp.asarray, random_pair_batch(8, 24, config.vocab_size, seed=4))
    batch["valid"] = batch["valid"].at[5].set(False)
    settings, optimizer = _settings(CASES["sorted+ld"]), optax.sgd(1.0)  # the update is minus the gradient
    results = [
        jax.jit(make_train_step(model, settings, optimizer, grad_accum=accum, chunk_size=8))(
            TrainState.create(params, optimizer), ref_params, batch
        )
        for accum in (1, 4)
    ]
    (full, full_metrics), (accum, accum_metrics) = results
    for metric in METRIC_NAMES:
        np.testing.assert_allclose(accum_metrics[metric], full_metrics[metric], rtol=1e-5, err_msg=metric)
    grads = lambda state: jax.tree_util.tree_map(jnp.subtract, params, state.params)  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(grads(full)), jax.tree_util.tree_leaves(grads(accum))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))
    values = jax.jit(make_eval_step(model, settings, chunk_size=8))(params, ref_params, batch)
    precomputed = jax.jit(make_reference_step(model, chunk_size=8, ld_alpha=settings.ld_alpha))(ref_params, batch)
    np.testing.assert_allclose(precomputed, (values["reference_chosen"], values["reference_rejected"]), rtol=1e-6)
    valid = np.asarray(values.pop("valid")) > 0
    eval_metrics = pair_set_metrics({k: np.asarray(v)[valid] for k, v in values.items()}, settings)
    np.testing.assert_allclose(eval_metrics["loss"], full_metrics["loss"], rtol=1e-5)
    per_micro = [
        pair_set_metrics({k: np.asarray(v)[valid & (np.arange(8) % 4 == m)] for k, v in values.items()}, settings)
        for m in range(4)
    ]
    assert abs(float(np.mean([m["loss"] for m in per_micro])) - float(full_metrics["loss"])) > 1e-3


@pytest.mark.slow
def test_sorted_losses_sharded_equal_single_device():
    """aot + aot_unpaired data parallel over 8 CPU devices with 2 micro-batches == 1 device, 1 micro-batch: the sort
    covers the global batch, not a device's or a micro-batch's rows."""
    script = Path(__file__).with_name("sorted_loss_sharded_script.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cpu_env(8), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"8x1x1"}
    for mesh, row in report.items():
        np.testing.assert_allclose(row["losses"], row["single_losses"], rtol=1e-5, err_msg=mesh)
        assert row["losses"][1] != row["losses"][0]  # the first step moved the parameters
        assert row["param_max_abs_diff"] < 1e-5, (mesh, row)
