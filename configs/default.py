"""The default config (`get_config()`), as far as the trainer exists so far.

Sections present: `model` (the checkpoint and how to run it), `data` (sources, formats,
tokenization, truncation, batching; see sdpo_jax.data.config) and `mesh` (device mesh axis
sizes, -1 = all devices left; see sdpo_jax.sharding.build_mesh). The sDPO sections (`sdpo`,
`train`, `dpo`, `checkpoint`, `output_dir`) arrive with the `sdpo-train` command.
"""
import ml_collections

from sdpo_jax.data.config import get_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.path = "smollm2-135m-instruct"  # HF folder, .gguf file, or a named PyPI-shipped GGUF
    config.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    config.model.attention = "auto"  # auto | xla | cudnn
    config.model.remat = "none"  # none | full | dots
    config.model.logprob_chunk = 128  # sequence positions per chunk of the output-layer log-probs
    config.data = get_data_config()
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return config
