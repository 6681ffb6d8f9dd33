"""The project's own error types: problems a user can fix, each told in one line.

Every command prints these as ``<command>: error: <message>`` and exits with status 2
(sdpo_jax.cli.errors). Errors of the environment rather than of the input (a missing package, an
unreadable or full disk, no memory left) are reported the same way, in one line, by the commands;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class SdpoError(Exception):
    """A problem with the user's input or run folder; the message is one line saying what and where."""


class ConfigError(SdpoError, ValueError):
    """A config field with a value the run cannot use; the message names the field."""


class RunLocked(SdpoError):
    """Another process is training in the same output_dir."""


class TrainingDiverged(SdpoError):
    """The loss or the gradient norm became non-finite: the stage stops and nothing of it is saved as finished."""


class CorruptCheckpoint(SdpoError):
    """A checkpoint whose files cannot be read or whose contents differ from what was saved."""
