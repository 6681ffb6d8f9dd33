"""Command-line tools of sdpo_jax (console scripts declared in setup.py)."""
