"""Learning-rate schedules: pure functions of the 1-based update count, so a resumed run continues exactly.

Every schedule starts with the same linear warmup from `warmup_init_lr` to `lr` over `warmup_updates` (0 = none),
then follows `optim.schedule`:

- `inverse_sqrt` (default; Vaswani et al. 2017, fairseq): lr * sqrt(warmup_updates / update).
- `constant`: lr.
- `step_decay` (GluonNLP's GNMT recipe: constant Adam 1e-3, halved late): lr until `decay_start_updates`, then
  lr * decay_factor ** (1 + (update - decay_start_updates) // decay_every_updates); `decay_every_updates` = 0
  means a single decay at `decay_start_updates`. GluonNLP halves once per epoch from 2/3 of its epochs; a
  time-budgeted run states the update counts directly (updates per minute times minutes).

Any schedule can end with a linear cooldown (`cooldown_updates` > 0; the warmup-stable-decay shape of Hägele et
al. 2024, Sockeye's and fairseq's linear decay to a known end): over the last `cooldown_updates` updates before
`train.max_updates` the rate falls linearly from the schedule's value at the cooldown's start towards 0, reaching
lr_start / cooldown_updates at the last update. A run stopped earlier (by time or patience) never cools down.

    lr = lr_at(update, cfg.optim, cfg.train.max_updates)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_nmt.config import OptimConfig

SCHEDULES = ("constant", "inverse_sqrt", "step_decay")


def warmup_lr(update: int, lr: float, warmup_updates: int, warmup_init_lr: float) -> float:
    """Linear rise from `warmup_init_lr` (before update 1) to `lr` at update `warmup_updates`."""
    return warmup_init_lr + (lr - warmup_init_lr) * update / warmup_updates


def inverse_sqrt(update: int, lr: float, warmup_updates: int) -> float:
    """lr * sqrt(warmup / update) after the warmup (lr itself without one)."""
    return lr * (warmup_updates / update) ** 0.5 if warmup_updates > 0 else lr


def step_decay(update: int, lr: float, decay_start_updates: int, decay_every_updates: int,
               decay_factor: float) -> float:
    """lr before `decay_start_updates`; from there multiplied by `decay_factor` once, then every
    `decay_every_updates` more (never again when that is 0)."""
    if decay_start_updates <= 0 or update < decay_start_updates:
        return lr
    steps = 1 + ((update - decay_start_updates) // decay_every_updates if decay_every_updates > 0 else 0)
    return lr * decay_factor ** steps


def cooldown_factor(update: int, cooldown_updates: int, max_updates: int) -> float:
    """1 before the cooldown; (max_updates + 1 - update) / cooldown_updates inside it (1 at its first update)."""
    start = max_updates - cooldown_updates
    if cooldown_updates <= 0 or max_updates <= 0 or update <= start:
        return 1.0
    return max(0.0, (max_updates + 1 - update) / cooldown_updates)


def lr_at(update: int, optim: OptimConfig, max_updates: int = 0) -> float:
    """Learning rate for 1-based `update` under `optim` (lr, warmup_*, schedule, decay_*, cooldown_updates before
    `max_updates`, the run's train.max_updates)."""
    update = max(1, update)
    if optim.cooldown_updates > 0 and max_updates > 0 and update > max_updates - optim.cooldown_updates:
        start = max(1, max_updates - optim.cooldown_updates)
        return _schedule_lr(start, optim) * cooldown_factor(update, optim.cooldown_updates, max_updates)
    return _schedule_lr(update, optim)


def _schedule_lr(update: int, optim: OptimConfig) -> float:
    if update <= optim.warmup_updates:
        return warmup_lr(update, optim.lr, optim.warmup_updates, optim.warmup_init_lr)
    if optim.schedule == "inverse_sqrt":
        return inverse_sqrt(update, optim.lr, optim.warmup_updates)
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "step_decay":
        return step_decay(update, optim.lr, optim.decay_start_updates, optim.decay_every_updates,
                          optim.decay_factor)
    raise ValueError(f"unknown optim.schedule '{optim.schedule}'; choose one of: {', '.join(SCHEDULES)}")
