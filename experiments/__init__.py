"""Experiments that use the trainer end to end: `python -m experiments.stepwise` (the toy sDPO check) and
`python -m experiments.real_model` (SmolLM2-135M-Instruct).

Like the command-line tools (sdpo_jax/cli/__init__.py), they run every model in Flax and need transformers
only for tokenizers, so its start-up advice that without PyTorch "Models won't be available" is turned off
(a user's own setting wins).
"""

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
