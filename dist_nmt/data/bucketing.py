"""Length buckets and the epoch-independent plan of how many batches each bucket gives.

    boundaries = bucket_boundaries(max_len=128)            # [8, 16, ..., 128, 136]
    plan = plan_buckets(src_lengths, tgt_lengths, max_tokens=4096, num_shards=2, boundaries=boundaries)

A pair's padded length is max(src_len + 1, tgt_len + 1) (EOS on the source and on `tgt_out`, BOS on `tgt_in`);
it goes to the first bucket whose upper boundary L is >= that, and both sides of its batch are padded to L.
A batch of a bucket holds at most `max_tokens // L` rows rounded DOWN to a multiple of `rows_multiple`, so after the
collate step rounds the row count UP to that multiple, rows * L <= max_tokens still holds.
Each group of buckets gives a multiple of `num_shards` batches, so every rank gets the same number of batches and
all ranks draw the same group at each global step. A bucket with fewer than `num_shards` sentences cannot do that;
it is merged into the next longer bucket (the longest into the previous one), padding to the longer boundary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dist_nmt.data.text import DataError


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket_boundaries(max_len: int, step: int = 8) -> list[int]:
    """Bucket upper boundaries: multiples of `step` up to the first >= max_len + 1 (a sentence of max_len + EOS)."""
    if max_len < 0 or step <= 0:
        raise ValueError(f"bucket_boundaries needs max_len >= 0 and step > 0, got max_len={max_len}, step={step}")
    top = _round_up(max_len + 1, step)
    return list(range(step, top + 1, step))


def padded_lengths(src_lengths: np.ndarray, tgt_lengths: np.ndarray) -> np.ndarray:
    """Positions each pair needs: max(src_len + 1, tgt_len + 1)."""
    return np.maximum(np.asarray(src_lengths, dtype=np.int64), np.asarray(tgt_lengths, dtype=np.int64)) + 1


def assign_buckets(src_lengths: np.ndarray, tgt_lengths: np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
    """Bucket index (into `boundaries`) of every pair; DataError if a pair is longer than the last boundary."""
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target lengths")
    need = padded_lengths(src_lengths, tgt_lengths)
    bucket = np.searchsorted(np.asarray(boundaries), need, side="left")
    over = np.flatnonzero(bucket == len(boundaries))
    if len(over):
        i = int(over[0])
        raise DataError(f"pair {i} (src {int(src_lengths[i])}, tgt {int(tgt_lengths[i])} tokens) needs {int(need[i])} "
                        f"positions but the largest bucket is {boundaries[-1]} ({len(over)} pairs too long); build "
                        "the boundaries from the real maximum, e.g. bucket_boundaries(max length), or drop long "
                        "pairs (prepare drops train pairs over data.max_len)")
    return bucket


@dataclass(frozen=True)
class BucketPlan:
    """Epoch-independent grouping: sentences of group g are padded to pad_lens[g] and split into num_batches[g]
    batches (a multiple of num_shards) of at most max_rows[g] rows each."""

    group_of: np.ndarray  # (N,) group id of every sentence
    pad_lens: tuple[int, ...]  # L of each group
    buckets: tuple[int, ...]  # index into the boundaries of each group's L
    max_rows: tuple[int, ...]
    num_batches: tuple[int, ...]
    num_shards: int
    rows_multiple: int

    @property
    def batches_per_shard(self) -> int:
        """Batches each rank gets per epoch (= global steps per epoch)."""
        return sum(self.num_batches) // self.num_shards


def _merge_small(counts: np.ndarray, num_shards: int) -> list[list[int]]:
    """Group non-empty buckets (ascending) so every group has >= num_shards sentences."""
    groups: list[list[int]] = []
    pending: list[int] = []
    for b in np.flatnonzero(counts):
        pending.append(int(b))
        if counts[pending].sum() >= num_shards:
            groups.append(pending)
            pending = []
    if pending and groups:
        groups[-1].extend(pending)
    elif not groups:
        raise DataError(f"only {int(counts.sum())} sentences for num_shards={num_shards}: every rank needs at "
                        "least one sentence per step; use fewer processes or more data")
    return groups


def max_rows_for(pad_len: int, max_tokens: int, rows_multiple: int) -> int:
    """Most rows a batch of padded length `pad_len` may have: a multiple of rows_multiple with rows * L <= budget."""
    rows = (max_tokens // pad_len) // rows_multiple * rows_multiple
    if rows == 0:
        raise DataError(f"max_tokens={max_tokens} cannot hold {rows_multiple} rows of padded length {pad_len}; raise "
                        f"train.max_tokens to at least {pad_len * rows_multiple} or lower data.max_len")
    return rows


def plan_buckets(src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, num_shards: int,
                 boundaries: Sequence[int], rows_multiple: int = 8) -> BucketPlan:
    """Assign pairs to buckets, merge buckets too small for num_shards, and size every group's batches."""
    if num_shards < 1 or rows_multiple < 1:
        raise ValueError(f"num_shards and rows_multiple must be >= 1, got {num_shards} and {rows_multiple}")
    bucket = assign_buckets(src_lengths, tgt_lengths, boundaries)
    counts = np.bincount(bucket, minlength=len(boundaries))
    groups = _merge_small(counts, num_shards)
    group_of_bucket = np.zeros(len(boundaries), dtype=np.int16 if len(groups) < 2**15 else np.int32)
    pad_lens, max_rows, num_batches = [], [], []
    for g, members in enumerate(groups):
        group_of_bucket[members] = g
        pad_len, count = int(boundaries[members[-1]]), int(counts[members].sum())
        rows = max_rows_for(pad_len, max_tokens, rows_multiple)
        batches = _round_up(_round_up(count, rows) // rows, num_shards)
        if batches > count:
            raise DataError(f"cannot split {count} sentences of padded length {pad_len} into a multiple of "
                            f"num_shards={num_shards} non-empty batches of <= {rows} rows; raise train.max_tokens")
        pad_lens.append(pad_len)
        max_rows.append(rows)
        num_batches.append(batches)
    return BucketPlan(group_of=group_of_bucket[bucket], pad_lens=tuple(pad_lens),
                      buckets=tuple(g[-1] for g in groups), max_rows=tuple(max_rows),
                      num_batches=tuple(num_batches), num_shards=num_shards, rows_multiple=rows_multiple)
