"""Experiments that use the trainer end to end; `python -m experiments.stepwise` is the sDPO check."""
