"""Training progress and the error that stops training (importable without mxnet, shared by train and run)."""
from __future__ import annotations

from dataclasses import dataclass


class TrainingError(RuntimeError):
    """Training had to stop; the message says why and what is intact."""


@dataclass
class Progress:
    """Where training is; saved in every checkpoint's state.json."""

    update: int = 0
    epoch: int = 0
    batch_index: int = 0
    best_bleu: float = -1.0
    evals_without_improvement: int = 0
    bad_updates_in_a_row: int = 0
    num_skipped_updates: int = 0
