"""sdpo_jax: stepwise Direct Preference Optimization (sDPO, arXiv 2403.19270) in JAX/Flax."""

__version__ = "0.1.0"
