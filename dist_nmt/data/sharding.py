"""Global steps across ranks: every rank runs the same number of batches, all ranks draw the same shape each step.

    stream = BatchStream(train.src_lengths, train.tgt_lengths, max_tokens=4096, seed=1, rank=world.rank,
                         num_shards=world.size)
    for epoch, index, plan in stream.iterate(epoch=0, index=0):    # resume: next_position(saved epoch, index)
        batch = collate(train, plan)

A global step is one batch per rank, all from the same shape class (Horovod 0.28.1 for MXNet has no join: ranks must
run identical step counts, or the job hangs). The order of sentences within buckets and of global steps is a pure
function of (seed, epoch) through np.random.default_rng((seed, epoch)), so every rank computes the same epoch without
communicating, and a resumed run continues exactly where it stopped. Every sentence appears exactly once per epoch
across all ranks.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dist_nmt.data.batch import BatchPlan
from dist_nmt.data.bucketing import ROWS_MULTIPLE, BucketPlan, plan_buckets

CACHED_EPOCHS = 2  # an epoch boundary needs the current and the next epoch


def next_position(epoch: int, index: int, batches_per_epoch: int, step: int = 1) -> tuple[int, int]:
    """The data position `step` batches after batch `index` of `epoch`, rolling over into later epochs.

    The one epoch roll-over: the trainer advances with it, and `step=0` normalises an index past the end
    (index == batches_per_epoch is batch 0 of the next epoch).
    """
    if epoch < 0 or index < 0 or batches_per_epoch < 1:
        raise ValueError(f"need epoch >= 0, index >= 0 and batches_per_epoch >= 1, got {epoch}, {index}, "
                         f"{batches_per_epoch}")
    total = index + step
    return epoch + total // batches_per_epoch, total % batches_per_epoch


@dataclass(frozen=True)
class _EpochLayout:
    """All batches of one epoch, step-major (batch j of global step s is at s * num_shards + j)."""

    order: np.ndarray  # sentence ids grouped by bucket group, shuffled within each group
    starts: np.ndarray  # start of each batch in `order`
    sizes: np.ndarray  # sentences in each batch
    groups: np.ndarray  # group id of each batch


def _epoch_layout(plan: BucketPlan, seed: int, epoch: int) -> _EpochLayout:
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(plan.group_of))
    order = perm[np.argsort(plan.group_of[perm], kind="stable")]  # stable: keeps the shuffle within each group
    counts = np.bincount(plan.group_of, minlength=len(plan.rows))
    sizes = np.concatenate([c // k + (np.arange(k) < c % k) for c, k in zip(counts, plan.num_batches, strict=True)])
    starts = np.cumsum(sizes) - sizes
    groups = np.repeat(np.arange(len(plan.rows)), plan.num_batches)
    num_steps = len(sizes) // plan.num_shards
    step_order = rng.permutation(num_steps)
    batch_order = (step_order[:, None] * plan.num_shards + np.arange(plan.num_shards)).ravel()
    return _EpochLayout(order=order, starts=starts[batch_order], sizes=sizes[batch_order], groups=groups[batch_order])


def _make_batch(plan: BucketPlan, layout: _EpochLayout, j: int) -> BatchPlan:
    start, size, group = int(layout.starts[j]), int(layout.sizes[j]), int(layout.groups[j])
    return BatchPlan(indices=layout.order[start:start + size], src_pad_len=plan.src_pad_lens[group],
                     tgt_pad_len=plan.tgt_pad_lens[group], bucket=group, num_rows=plan.rows[group])


def make_global_batches(src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, num_shards: int,
                        seed: int, epoch: int, rows_multiple: int = ROWS_MULTIPLE) -> list[tuple[BatchPlan, ...]]:
    """One epoch as global steps: a tuple of `num_shards` batches (rank r takes element r), all of one shape."""
    return global_steps(plan_buckets(src_lengths, tgt_lengths, max_tokens, num_shards, rows_multiple), seed, epoch)


def global_steps(plan: BucketPlan, seed: int, epoch: int) -> list[tuple[BatchPlan, ...]]:
    """One epoch of `plan` as global steps (tuples of plan.num_shards batches)."""
    num_shards = plan.num_shards
    layout = _epoch_layout(plan, seed, epoch)
    batches = [_make_batch(plan, layout, j) for j in range(len(layout.sizes))]
    return [tuple(batches[s:s + num_shards]) for s in range(0, len(batches), num_shards)]


class BatchStream:
    """This rank's batches, epoch after epoch, resumable at any (epoch, index).

    The shape classes are planned once from the lengths (`plan_buckets`), or taken from `plan` (benchmarks compare
    planners this way). Per-epoch batch lists are cached for the last CACHED_EPOCHS epochs.
    """

    def __init__(self, src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, seed: int, rank: int,
                 num_shards: int, *, rows_multiple: int = ROWS_MULTIPLE, plan: BucketPlan | None = None) -> None:
        if not 0 <= rank < num_shards:
            raise ValueError(f"rank {rank} is outside 0..{num_shards - 1} (num_shards={num_shards})")
        if plan is None:
            plan = plan_buckets(src_lengths, tgt_lengths, max_tokens, num_shards, rows_multiple)
        elif plan.num_shards != num_shards or len(plan.group_of) != len(src_lengths):
            raise ValueError(f"plan is for {plan.num_shards} shards and {len(plan.group_of)} sentences, not "
                             f"{num_shards} and {len(src_lengths)}")
        self.plan = plan
        self.seed, self.rank, self.num_shards = seed, rank, num_shards
        self._cache: dict[int, list[BatchPlan]] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank runs per epoch (the same on every rank, and in every epoch)."""
        return self.plan.batches_per_shard

    def next_position(self, epoch: int, index: int) -> tuple[int, int]:
        """Position after batch `index` of `epoch` (see the module-level next_position)."""
        return next_position(epoch, index, self.batches_per_epoch)

    def epoch_batches(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of `epoch`, in order."""
        if epoch not in self._cache:
            layout = _epoch_layout(self.plan, self.seed, epoch)
            mine = range(self.rank, len(layout.sizes), self.num_shards)
            self._cache[epoch] = [_make_batch(self.plan, layout, j) for j in mine]
            for old in sorted(self._cache)[:-CACHED_EPOCHS]:
                del self._cache[old]
        return self._cache[epoch]

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, BatchPlan]]:
        """Yield (epoch, index, plan) forever, starting at batch `index` of `epoch`.

        An index past the end of the epoch rolls over (index == batches_per_epoch is batch 0 of the next epoch).
        """
        epoch, index = next_position(epoch, index, self.batches_per_epoch, step=0)
        while True:
            yield epoch, index, self.epoch_batches(epoch)[index]
            epoch, index = self.next_position(epoch, index)
