"""The project's error types: user mistakes and conditions that stop a run, each with a message naming the fix.

MXNet-free, so the command line can map them to exit codes (`dist_nmt.cli.EXIT_CODES`) before MXNet loads. Any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key path and the fix."""


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) or config key, and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt, or does not belong to this run."""


class PrecisionError(RuntimeError):
    """A precision setting this device cannot run, or loss scaling that cannot recover."""


class TrainingError(RuntimeError):
    """Training had to stop; the message says why and what is intact."""
