"""Learning-rate schedule: linear warmup then inverse square root (Vaswani et al., 2017; fairseq's inverse_sqrt)."""
from __future__ import annotations


def lr_at(update: int, lr: float, warmup_updates: int, warmup_init_lr: float = 0.0) -> float:
    """Learning rate for 1-based `update`.

    Rises linearly from `warmup_init_lr` to `lr` over `warmup_updates`, then decays as lr * sqrt(warmup / update).
    A pure function of the update count, so a resumed run continues the schedule exactly where it stopped.
    """
    update = max(1, update)
    if warmup_updates <= 0:
        return lr
    if update <= warmup_updates:
        return warmup_init_lr + (lr - warmup_init_lr) * update / warmup_updates
    return lr * (warmup_updates / update) ** 0.5
