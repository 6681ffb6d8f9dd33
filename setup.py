"""Installs sdpo_jax: stepwise DPO (sDPO) for JAX/Flax on TPU, GPU and CPU."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "transformers>=5.0",
    "jinja2>=3.1",  # transformers renders chat templates with it, but does not require it
    "datasets>=5.0",
    "ml-collections>=1.1",
    "absl-py>=2.0",
    "safetensors>=0.7",  # hf_import reads with safe_open(framework="numpy") + get_slice; BF16 checked on 0.7.0
    "ml_dtypes>=0.5",
    "numpy>=2.0",
    "gguf>=0.17",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]
# torch==2.13.0 is pinned: it is the CPU build; a looser pin pulls a multi-GB CUDA build.
TEST = ["pytest>=8", "pytest-xdist>=3.5", "ruff==0.17.6", "torch==2.13.0", "accelerate>=1.10", "trl==1.16.0"]
BENCH = ["torch==2.13.0", "accelerate>=1.10", "trl==1.16.0"]

setup(
    name="sdpo_jax",
    version="0.1.0",
    description="Stepwise Direct Preference Optimization (sDPO) for JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sdpo_jax", "sdpo_jax.*", "configs"]),
    package_data={
        "sdpo_jax.data": ["samples/*/*"],
        "sdpo_jax.models": ["assets/*/*"],
        "configs": ["model_shapes/*/config.json"],
    },
    include_package_data=True,
    install_requires=RUNTIME,
    extras_require={"test": TEST, "bench": BENCH},
    entry_points={
        "console_scripts": [
            "sdpo-convert=sdpo_jax.cli.convert:main",
            "sdpo-eval=sdpo_jax.cli.eval:main",
            "sdpo-train=sdpo_jax.cli.train:main",
            "sdpo-export=sdpo_jax.cli.export:main",
            "sdpo-report=sdpo_jax.cli.report:main",
            "sdpo-choices=sdpo_jax.cli.choices:main",
            "sdpo-plan=sdpo_jax.cli.plan:main",
        ]
    },
)
