"""A batch of sentence indices, and turning it into padded id arrays for the model.

    arrays = collate(train_split, batch)
    arrays.src.shape == (batch.num_rows, batch.src_pad_len)     # (B, L) int32

Layout of one collated batch (B rows incl. dummy rows, L the bucket's padded length, n real sentences):
    src      (B, L) int32    ids + [EOS], PAD after            src_valid_len (B,) float32 = src_len + 1
    tgt_in   (B, L) int32    [BOS] + ids, PAD after            tgt_valid_len (B,) float32 = tgt_len + 1
    tgt_out  (B, L) int32    ids + [EOS], PAD after
Rows n..B-1 are dummy rows that keep B a multiple of rows_multiple (few distinct shapes for hybridized graphs):
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
class Batch:
    """Sentence indices of one batch and its padded shape: (num_rows, src_pad_len) / (num_rows, tgt_pad_len)."""

    indices: np.ndarray  # (n,) sentence ids in the split
    src_pad_len: int
    tgt_pad_len: int
    bucket: int  # index into the bucket boundaries of the padded length
    num_rows: int  # n rounded up to a multiple of rows_multiple (dummy rows included)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True, eq=False)
class ArrayBatch:
    """One collated batch: padded id arrays (see the module docstring) and its real-token counts."""

    src: np.ndarray  # (B, S) int32
    src_valid_len: np.ndarray  # (B,) float32
    tgt_in: np.ndarray  # (B, T) int32
    tgt_out: np.ndarray  # (B, T) int32
    tgt_valid_len: np.ndarray  # (B,) float32
    num_src_tokens: int
    num_tgt_tokens: int


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


def collate(split: EncodedSplit, batch: Batch, rows_multiple: int | None = None) -> ArrayBatch:
    """Padded arrays of `batch` (see the module docstring for the layout).

    Rows = `batch.num_rows` (as planned by the batcher), or, if `rows_multiple` is given, the sentence count rounded
    up to it. Raises DataError if a sentence does not fit the batch's padded lengths.
    """
    idx = np.asarray(batch.indices, dtype=np.int64)
    n = len(idx)
    rows = batch.num_rows if rows_multiple is None else rows_for(n, rows_multiple)
    src_len = split.src_lengths[idx].astype(np.int64)
    tgt_len = split.tgt_lengths[idx].astype(np.int64)
    if n and (src_len.max() >= batch.src_pad_len or tgt_len.max() >= batch.tgt_pad_len or rows < n):
        raise DataError(f"batch of bucket {batch.bucket} does not fit split {split.name!r}: longest src "
                        f"{src_len.max()} + EOS > {batch.src_pad_len} or tgt {tgt_len.max()} + BOS > "
                        f"{batch.tgt_pad_len} or {n} sentences > {rows} rows; build batches from this split's lengths")
    real = np.arange(n)
    src = np.full((rows, batch.src_pad_len), PAD_ID, dtype=np.int32)
    _place(src, split.src_tokens, split.src_offsets, idx, src_len, shift=0)
    src[real, src_len] = EOS_ID
    src[n:, 0] = EOS_ID
    tgt_in = np.full((rows, batch.tgt_pad_len), PAD_ID, dtype=np.int32)
    tgt_in[:, 0] = BOS_ID
    _place(tgt_in, split.tgt_tokens, split.tgt_offsets, idx, tgt_len, shift=1)
    tgt_out = np.full((rows, batch.tgt_pad_len), PAD_ID, dtype=np.int32)
    _place(tgt_out, split.tgt_tokens, split.tgt_offsets, idx, tgt_len, shift=0)
    tgt_out[real, tgt_len] = EOS_ID
    src_valid_len = np.ones(rows, dtype=np.float32)
    src_valid_len[:n] = src_len + 1
    tgt_valid_len = np.zeros(rows, dtype=np.float32)
    tgt_valid_len[:n] = tgt_len + 1
    return ArrayBatch(src, src_valid_len, tgt_in, tgt_out, tgt_valid_len, num_src_tokens=int(src_len.sum()) + n,
                      num_tgt_tokens=int(tgt_len.sum()) + n)


def padding_ratio(real_tokens: float, padded_slots: float) -> float:
    """Padding efficiency of one side: real tokens / padded positions computed (0 when nothing was computed)."""
    return real_tokens / padded_slots if padded_slots else 0.0


def _flat(batches: Iterable[Batch | tuple[Batch, ...]]) -> list[Batch]:
    return [b for item in batches for b in (item if isinstance(item, tuple) else (item,))]


def padding_efficiency(batches: Iterable[Batch | tuple[Batch, ...]], src_lengths: np.ndarray,
                       tgt_lengths: np.ndarray) -> float:
    """Real tokens (src_len + 1 + tgt_len + 1 per sentence) / padded slots (rows * (src_pad_len + tgt_pad_len)).

    Dummy rows count as padding. Accepts per-rank batches or global steps (tuples of batches).
    """
    flat = _flat(batches)
    if not flat:
        return 0.0
    idx = np.concatenate([b.indices for b in flat]).astype(np.int64)
    real = int(np.asarray(src_lengths)[idx].sum() + np.asarray(tgt_lengths)[idx].sum()) + 2 * len(idx)
    slots = sum(b.num_rows * (b.src_pad_len + b.tgt_pad_len) for b in flat)
    return real / slots


def random_batch(rows: int, src_len: int, tgt_len: int, vocab_size: int, seed: int = 0) -> ArrayBatch:
    """A batch of random ids in [4, vocab_size) with every sentence at full length (for benchmarks and tests):
    src = ids + [EOS] over `src_len` positions, tgt_in = [BOS] + ids, tgt_out = ids + [EOS] over `tgt_len`."""
    rng = np.random.RandomState(seed)
    src = rng.randint(4, vocab_size, (rows, src_len)).astype(np.int32)
    tgt = rng.randint(4, vocab_size, (rows, tgt_len + 1)).astype(np.int32)
    src[:, -1], tgt[:, 0], tgt[:, -1] = EOS_ID, BOS_ID, EOS_ID
    return ArrayBatch(src, np.full(rows, src_len, np.float32), tgt[:, :-1].copy(), tgt[:, 1:].copy(),
                      np.full(rows, tgt_len, np.float32), num_src_tokens=rows * src_len, num_tgt_tokens=rows * tgt_len)
