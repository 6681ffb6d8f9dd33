"""Hugging Face checkpoint import and export: round trips, shards, dtypes and refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from hf_fixtures import FAMILIES, load_torch_model
from sdpo_jax.checkpoint import hf_import
from sdpo_jax.checkpoint.hf_export import save_hf_checkpoint
from sdpo_jax.checkpoint.hf_import import CheckpointError, HFTensors, load_hf_checkpoint
from sdpo_jax.checkpoint.param_mapping import get_leaf, tensor_specs
from sdpo_jax.checkpoint.safetensors_io import write_safetensors
from sdpo_jax.models import UnsupportedModelError


def _read_all(path):
    """Every tensor of a safetensors file, read by the safetensors library (independently of our writer)."""
    with safe_open(path, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _assert_trees_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_export_import_is_bit_identical(hf_checkpoint, tmp_path, family):
    folder = hf_checkpoint(family)
    config, params = load_hf_checkpoint(folder)
    save_hf_checkpoint(params, config, tmp_path / "out", source_folder=folder)
    config2, params2 = load_hf_checkpoint(tmp_path / "out")
    assert config2 == config
    _assert_trees_identical(params, params2)
    # The exported tensors are byte-for-byte the ones transformers wrote.
    original, ours = _read_all(folder / "model.safetensors"), _read_all(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(ours)
    for name in original:
        assert ours[name].dtype == original[name].dtype
        np.testing.assert_array_equal(original[name], ours[name])


def test_export_loads_in_transformers_with_same_logits_and_tokenizer(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("qwen2")
    config, params = load_hf_checkpoint(folder)
    out = save_hf_checkpoint(params, config, tmp_path / "export", source_folder=folder)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = load_torch_model(folder)(input_ids=ids).logits
        got = load_torch_model(out)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.encode("Hello world")[0] == 1  # the Llama tokenizer adds <s>
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_export_without_source_writes_a_config_transformers_reads(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("mistral")
    config, params = load_hf_checkpoint(folder)
    out = save_hf_checkpoint(params, config, tmp_path / "bare")
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert type(hf_config).__name__ == "MistralConfig" and hf_config.sliding_window == config.sliding_window
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            load_torch_model(out)(input_ids=ids).logits, load_torch_model(folder)(input_ids=ids).logits
        )


def test_sharded_checkpoints_both_ways(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("llama3")
    config, params = load_hf_checkpoint(folder)
    load_torch_model(folder).save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    _assert_trees_identical(load_hf_checkpoint(tmp_path / "hf_sharded")[1], params)

    out = save_hf_checkpoint(params, config, tmp_path / "ours_sharded", source_folder=folder, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "ours_sharded" / "model.safetensors").exists()
    _assert_trees_identical(load_hf_checkpoint(out)[1], params)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            load_torch_model(out)(input_ids=ids).logits, load_torch_model(folder)(input_ids=ids).logits
        )


def test_bfloat16_checkpoints(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("llama2")
    load_torch_model(folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config, params = load_hf_checkpoint(tmp_path / "bf16")  # into float32 master weights
    _, params_bf16 = load_hf_checkpoint(tmp_path / "bf16", param_dtype=ml_dtypes.bfloat16)
    assert params["embed_tokens"].dtype == np.float32 and params_bf16["embed_tokens"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params["embed_tokens"], params_bf16["embed_tokens"].astype(np.float32))
    save_hf_checkpoint(params, config, tmp_path / "bf16_again", dtype="bfloat16", source_folder=folder)
    a, b = _read_all(tmp_path / "bf16" / "model.safetensors"), _read_all(tmp_path / "bf16_again" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a[name], b[name])
    assert load_torch_model(tmp_path / "bf16_again", dtype=None).dtype == torch.bfloat16


def _copy(folder, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    return target


def _rewrite_weights(folder, edit):
    tensors = _read_all(folder / "model.safetensors")
    edit(tensors)
    write_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unsupported_architecture_is_named_with_the_supported_list(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama2"), tmp_path)
    _edit_config(folder, architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(
        UnsupportedModelError,
        match=r"config.json: architecture 'GemmaForCausalLM' is not supported; "
        r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (
            "missing",
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"tensor 'model.layers.1.mlp.up_proj.weight' is missing",
        ),
        (
            "extra",
            lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
            r"unexpected tensor 'model.layers.0.extra.weight'",
        ),
        (
            "shape",
            lambda t: t.update({"model.norm.weight": np.zeros(65, np.float32)}),
            r"tensor 'model.norm.weight' has shape \[65\], config.json implies \[64\]",
        ),
    ],
)
def test_bad_tensors_are_refused(hf_checkpoint, tmp_path, case, edit, message):
    folder = _copy(hf_checkpoint("llama2"), tmp_path)
    _rewrite_weights(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(folder)


def test_config_that_disagrees_with_the_weights_is_refused(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("qwen2"), tmp_path)
    _edit_config(folder, intermediate_size=128)
    with pytest.raises(
        CheckpointError, match=r"mlp.gate_proj.weight' has shape \[160, 64\], config.json implies \[128, 64\]"
    ):
        load_hf_checkpoint(folder)


def test_missing_weights_and_missing_shards_are_refused(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama2"), tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(
        CheckpointError, match="lists shard 'model-00001-of-00002.safetensors', which is not in the folder"
    ):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors", "header_too_long"])
def test_damaged_weight_files_are_refused_in_one_line_naming_the_file(hf_checkpoint, tmp_path, damage):
    folder = _copy(hf_checkpoint("llama2"), tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[:-100],
            "not_safetensors": b"<html>not found</html>",
            "header_too_long": (1 << 40).to_bytes(8, "little") + data[8:],
        }[damage]
    )
    with pytest.raises(CheckpointError) as raised:
        load_hf_checkpoint(folder)
    message = str(raised.value)
    assert message.startswith(f"{path}: not a readable safetensors file (") and "\n" not in message, message


def test_any_block_is_read_exactly_even_split_inside_a_flattened_axis(hf_checkpoint, monkeypatch):
    """Blocks split inside head_dim (several runs per HF row range) and reads cut into 256-element pieces
    (many get_slice calls per block) give exactly the host-loaded leaf's block, in the asked dtype."""
    folder = hf_checkpoint("qwen2")
    config, host = load_hf_checkpoint(folder)
    monkeypatch.setattr(hf_import, "_READ_ELEMENTS", 256)
    with safe_open(folder / "model.safetensors", framework="numpy") as handle:
        tensors = HFTensors(str(folder), config, {str(folder / "model.safetensors"): handle})
        for spec in tensor_specs(config):
            leaf = get_leaf(host, spec.path)
            index = tuple(slice(n // 3, n - n // 4) for n in leaf.shape)  # a strict inner block of every axis
            for dtype in (np.float32, ml_dtypes.bfloat16):
                block = tensors.read(spec, index, np.dtype(dtype))
                assert block.dtype == dtype and block.flags.c_contiguous
                np.testing.assert_array_equal(block, leaf[index].astype(dtype), err_msg="/".join(spec.path))


def test_untied_lm_head_beside_tied_embeddings_is_refused(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama3"), tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from the embeddings"):
        load_hf_checkpoint(folder)
    _rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    load_hf_checkpoint(folder)  # an equal copy is accepted


_SHARDED_LOAD_SCRIPT = """
import json, sys
import jax, ml_collections, numpy as np
from sdpo_jax.checkpoint.hf_import import HFTensors, load_hf_checkpoint
from sdpo_jax.models.loading import load_model
from sdpo_jax.sharding import build_mesh

folder, mesh_shape = sys.argv[1], tuple(int(n) for n in sys.argv[2].split("x"))
reads = []
real_read = HFTensors.read
def recording_read(self, spec, index, dtype):
    block = real_read(self, spec, index, dtype)
    reads.append(["/".join(spec.path), [[s.start, s.stop] for s in index], list(block.shape)])
    return block
HFTensors.read = recording_read  # instrumented, not replaced: every block still comes from the files

mesh = build_mesh(*mesh_shape)
model_section = ml_collections.ConfigDict(dict(path=folder, dtype="float32", attention="xla", remat="none"))
_, params, _ = load_model(model_section, mesh=mesh)
HFTensors.read = real_read
_, host = load_hf_checkpoint(folder)
leaves = {}
for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(host)):
    name = "/".join(k.key for k in path)
    shards_match = all(np.array_equal(np.asarray(s.data), expected[s.index]) for s in leaf.addressable_shards)
    leaves[name] = {"equal": bool(np.array_equal(np.asarray(leaf), expected)), "shards_match": shards_match,
                    "shape": list(leaf.shape), "shard_shape": list(leaf.sharding.shard_shape(leaf.shape)),
                    "distinct_shards": len({tuple((s.start, s.stop) for s in shard.index)
                                            for shard in leaf.addressable_shards})}
print(json.dumps({"reads": reads, "leaves": leaves}))
"""


@pytest.mark.parametrize("family, mesh_shape", [("qwen2", "2x2x2"), ("solar", "1x4x2")])
def test_sharded_load_reads_each_shard_only(hf_checkpoint, tmp_path, family, mesh_shape):
    """On 8 devices each parameter is assembled from per-shard reads of the safetensors files: every read
    is one device's block (never the whole tensor when the leaf is split), replicas share a read, and the
    placed arrays equal the host-loaded ones, shard by shard."""
    folder = tmp_path / "sharded_files"
    load_torch_model(hf_checkpoint(family)).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_LOAD_SCRIPT, str(folder), mesh_shape],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    leaves, reads = report["leaves"], report["reads"]
    assert set(leaves) == {path for path, _, _ in reads}
    split = 0
    for name, leaf in leaves.items():
        assert leaf["equal"] and leaf["shards_match"], name
        blocks = [shape for path, _, shape in reads if path == name]
        assert len(blocks) == leaf["distinct_shards"], name  # one read per distinct shard, none repeated
        assert all(shape == leaf["shard_shape"] for shape in blocks), name
        split += leaf["shard_shape"] != leaf["shape"]
    assert split >= 5  # embeddings, attention and MLP kernels really were split, so the reads were partial
