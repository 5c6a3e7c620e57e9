"""A batch plan (sentence indices + padded shape), the collated Batch of arrays, and padding efficiency.

    batch = collate(train_split, plan)              # plan: a BatchPlan from BatchStream
    batch.src.shape == (plan.num_rows, plan.src_pad_len)            # (B, S) int32
    padding_efficiency(batch.num_src_tokens, batch.num_tgt_tokens, batch.src_slots, batch.tgt_slots).src

Layout of one collated batch (B rows incl. dummy rows, S / T the class's padded source / target lengths, n real
sentences):
    src      (B, S) int32    ids + [EOS], PAD after            src_valid_len (B,) float32 = src_len + 1
    tgt_in   (B, T) int32    [BOS] + ids, PAD after            tgt_valid_len (B,) float32 = tgt_len + 1
    tgt_out  (B, T) int32    ids + [EOS], PAD after
Rows n..B-1 are dummy rows that keep B the class's row count (one shape per class for hybridized graphs):
src = [EOS] with src_valid_len 1 (attention never sees an all-masked row), tgt_in = [BOS], tgt_valid_len 0, so they
add nothing to the loss. num_src_tokens / num_tgt_tokens count real tokens only, EOS included.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dist_nmt.data.text import DataError
from dist_nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from dist_nmt.data.dataset import EncodedSplit


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """Sentence indices of one batch and its padded shape: (num_rows, src_pad_len) / (num_rows, tgt_pad_len)."""

    indices: np.ndarray  # (n,) sentence ids in the split
    src_pad_len: int
    tgt_pad_len: int
    bucket: int  # shape class (index into the BucketPlan's classes)
    num_rows: int  # rows incl. dummy rows: a multiple of ROWS_MULTIPLE, the same for every batch of the class

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True, eq=False)
class Batch:
    """One collated batch: the model's numpy inputs and its token counts (layout in the module docstring)."""

    src: np.ndarray  # (B, S) int32
    src_valid_len: np.ndarray  # (B,) float32
    tgt_in: np.ndarray  # (B, T) int32
    tgt_out: np.ndarray  # (B, T) int32
    tgt_valid_len: np.ndarray  # (B,) float32
    num_src_tokens: int  # real source tokens incl. EOS
    num_tgt_tokens: int  # real target tokens incl. EOS (= positions that enter the loss)

    @property
    def src_slots(self) -> int:
        """Padded source positions the model computes: B * S."""
        return int(self.src.size)

    @property
    def tgt_slots(self) -> int:
        """Padded target positions the model computes: B * T."""
        return int(self.tgt_in.size)

    def arrays(self) -> dict[str, np.ndarray]:
        """The five model inputs by name (for moving them to a device)."""
        return {"src": self.src, "src_valid_len": self.src_valid_len, "tgt_in": self.tgt_in,
                "tgt_out": self.tgt_out, "tgt_valid_len": self.tgt_valid_len}


@dataclass(frozen=True)
class PaddingEfficiency:
    """Real tokens / padded slots, per side and over both sides."""

    src: float
    tgt: float
    combined: float


def padding_efficiency(num_src_tokens: float, num_tgt_tokens: float, src_slots: float,
                       tgt_slots: float) -> PaddingEfficiency:
    """Real tokens (EOS included) over padded slots (dummy rows included) on each side; 0 where nothing was padded.

    The one formula behind the trainer's log line and scripts/bench_data.py.
    """
    def ratio(real: float, slots: float) -> float:
        return float(real) / float(slots) if slots > 0 else 0.0

    return PaddingEfficiency(ratio(num_src_tokens, src_slots), ratio(num_tgt_tokens, tgt_slots),
                             ratio(num_src_tokens + num_tgt_tokens, src_slots + tgt_slots))


def rows_for(num_sentences: int, rows_multiple: int) -> int:
    """`num_sentences` rounded up to a multiple of `rows_multiple`."""
    return -(-num_sentences // rows_multiple) * rows_multiple


def _place(out: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, indices: np.ndarray, lengths: np.ndarray,
           shift: int) -> None:
    """Copy sentence indices[r] into out[r, shift:shift + lengths[r]] for every r, without a Python loop."""
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(len(indices)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    out[rows, cols + shift] = tokens[np.repeat(offsets[indices], lengths) + cols]


def collate(split: EncodedSplit, plan: BatchPlan, rows_multiple: int | None = None) -> Batch:
    """Padded arrays of `plan` (see the module docstring for the layout).

    Rows = `plan.num_rows` (as planned by the batcher), or, if `rows_multiple` is given, the sentence count rounded
    up to it. Raises DataError if a sentence does not fit the plan's padded lengths.
    """
    idx = np.asarray(plan.indices, dtype=np.int64)
    n = len(idx)
    rows = plan.num_rows if rows_multiple is None else rows_for(n, rows_multiple)
    src_len = split.src_lengths[idx].astype(np.int64)
    tgt_len = split.tgt_lengths[idx].astype(np.int64)
    if n and (src_len.max() >= plan.src_pad_len or tgt_len.max() >= plan.tgt_pad_len or rows < n):
        raise DataError(f"batch of class {plan.bucket} does not fit split {split.name!r}: longest src "
                        f"{src_len.max()} + EOS > {plan.src_pad_len} or tgt {tgt_len.max()} + BOS > "
                        f"{plan.tgt_pad_len} or {n} sentences > {rows} rows; build batches from this split's lengths")
    real = np.arange(n)
    src = np.full((rows, plan.src_pad_len), PAD_ID, dtype=np.int32)
    _place(src, split.src_tokens, split.src_offsets, idx, src_len, shift=0)
    src[real, src_len] = EOS_ID
    src[n:, 0] = EOS_ID
    tgt_in = np.full((rows, plan.tgt_pad_len), PAD_ID, dtype=np.int32)
    tgt_in[:, 0] = BOS_ID
    _place(tgt_in, split.tgt_tokens, split.tgt_offsets, idx, tgt_len, shift=1)
    tgt_out = np.full((rows, plan.tgt_pad_len), PAD_ID, dtype=np.int32)
    _place(tgt_out, split.tgt_tokens, split.tgt_offsets, idx, tgt_len, shift=0)
    tgt_out[real, tgt_len] = EOS_ID
    src_valid_len = np.ones(rows, dtype=np.float32)
    src_valid_len[:n] = src_len + 1
    tgt_valid_len = np.zeros(rows, dtype=np.float32)
    tgt_valid_len[:n] = tgt_len + 1
    return Batch(src=src, src_valid_len=src_valid_len, tgt_in=tgt_in, tgt_out=tgt_out, tgt_valid_len=tgt_valid_len,
                 num_src_tokens=int(src_len.sum()) + n, num_tgt_tokens=int(tgt_len.sum()) + n)


def _flat(plans: Iterable[BatchPlan | tuple[BatchPlan, ...]]) -> list[BatchPlan]:
    return [b for item in plans for b in (item if isinstance(item, tuple) else (item,))]


def plan_padding_efficiency(plans: Iterable[BatchPlan | tuple[BatchPlan, ...]], src_lengths: np.ndarray,
                            tgt_lengths: np.ndarray) -> PaddingEfficiency:
    """padding_efficiency of planned batches without collating them (per-rank plans or global-step tuples)."""
    flat = _flat(plans)
    if not flat:
        return padding_efficiency(0, 0, 0, 0)
    idx = np.concatenate([b.indices for b in flat]).astype(np.int64)
    num_src = int(np.asarray(src_lengths)[idx].sum()) + len(idx)
    num_tgt = int(np.asarray(tgt_lengths)[idx].sum()) + len(idx)
    return padding_efficiency(num_src, num_tgt, sum(b.num_rows * b.src_pad_len for b in flat),
                              sum(b.num_rows * b.tgt_pad_len for b in flat))


def random_batch(rows: int, src_len: int, tgt_len: int, vocab_size: int, seed: int = 0) -> Batch:
    """A batch of random ids in [4, vocab_size) with every sentence at full length (for benchmarks and tests):
    src = ids + [EOS] over `src_len` positions, tgt_in = [BOS] + ids, tgt_out = ids + [EOS] over `tgt_len`."""
    rng = np.random.RandomState(seed)
    src = rng.randint(4, vocab_size, (rows, src_len)).astype(np.int32)
    tgt = rng.randint(4, vocab_size, (rows, tgt_len + 1)).astype(np.int32)
    src[:, -1], tgt[:, 0], tgt[:, -1] = EOS_ID, BOS_ID, EOS_ID
    return Batch(src, np.full(rows, src_len, np.float32), tgt[:, :-1].copy(), tgt[:, 1:].copy(),
                 np.full(rows, tgt_len, np.float32), num_src_tokens=rows * src_len, num_tgt_tokens=rows * tgt_len)
