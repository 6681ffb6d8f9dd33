"""Command-line tools of sdpo_jax (console scripts declared in setup.py).

Every command runs its models in Flax and needs transformers only for tokenizers and configs, so
transformers' start-up advice that without PyTorch "Models won't be available" would mislead a
user of the runtime-only install; it is turned off here (a user's own setting wins).
"""

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
