"""The project's own error types: problems a user can fix, each told in one line.

Every command prints these as ``<command>: error: <message>`` and exits with status 2
(sdpo_jax.cli.errors). Errors of the environment rather than of the input (a missing package, an
unreadable or full disk, no memory left) are reported the same way, in one line, by the commands.
Anything else is a bug in sdpo_jax: the commands print its traceback and say so.

Raise an `SdpoError` (or a subclass) only for what the user's input can cause: a config value, a
command-line option, a data file, a checkpoint, a run folder. A check of what our own code passes
to our own code stays a ValueError (or an assertion): it fails only through a bug. The families
with a type of their own: ConfigError (here), DataError (sdpo_jax.data.errors), CheckpointError
(sdpo_jax.checkpoint.hf_import), UnsupportedModelError (sdpo_jax.models.config), GGUFImportError
(sdpo_jax.checkpoint.gguf_import), MeshError (sdpo_jax.sharding), ScorerError (sdpo_jax.scorers),
PyPIWeightsError (sdpo_jax.checkpoint.pypi_weights).
"""

from __future__ import annotations


class SdpoError(Exception):
    """A problem with the user's input or run folder; the message is one line saying what and where."""


class ConfigError(SdpoError, ValueError):
    """A config field or command-line option with a value the run cannot use; the message names it."""


class RunLocked(SdpoError):
    """Another process is training in the same output_dir."""


class TrainingDiverged(SdpoError):
    """The loss or the gradient norm became non-finite: the stage stops and nothing of it is saved as finished."""


class CorruptCheckpoint(SdpoError):
    """A checkpoint whose files cannot be read or whose contents differ from what was saved."""
