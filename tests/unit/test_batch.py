"""collate() layout (hand-checked), dummy rows, guards, and the per-side padding efficiency."""
from __future__ import annotations

import numpy as np
import pytest

from dist_nmt.data.batch import BatchPlan, collate, padding_efficiency, plan_padding_efficiency
from dist_nmt.data.dataset import EncodedSplit
from dist_nmt.data.sharding import BatchStream
from dist_nmt.data.text import DataError
from dist_nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID


def _split(src: list[list[int]], tgt: list[list[int]]) -> EncodedSplit:
    def flat(side: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.array([t for s in side for t in s], dtype=np.int16)
        return tokens, np.concatenate([[0], np.cumsum([len(s) for s in side])])

    return EncodedSplit(*flat(src), *flat(tgt), name="tiny")


TINY = _split(src=[[5, 6], [7], []], tgt=[[8], [9, 10, 11], [12]])


def test_collate_layout_by_hand() -> None:
    batch = BatchPlan(indices=np.array([1, 0]), src_pad_len=5, tgt_pad_len=5, bucket=0, num_rows=4)
    out = collate(TINY, batch)
    assert out.src.tolist() == [[7, EOS_ID, 0, 0, 0], [5, 6, EOS_ID, 0, 0], [EOS_ID, 0, 0, 0, 0],
                                   [EOS_ID, 0, 0, 0, 0]]
    assert out.tgt_in.tolist() == [[BOS_ID, 9, 10, 11, 0], [BOS_ID, 8, 0, 0, 0], [BOS_ID, 0, 0, 0, 0],
                                      [BOS_ID, 0, 0, 0, 0]]
    assert out.tgt_out.tolist() == [[9, 10, 11, EOS_ID, 0], [8, EOS_ID, 0, 0, 0], [0] * 5, [0] * 5]
    assert out.src_valid_len.tolist() == [2, 3, 1, 1]  # dummy rows: just the EOS
    assert out.tgt_valid_len.tolist() == [4, 2, 0, 0]  # dummy rows: nothing enters the loss
    assert (out.num_src_tokens, out.num_tgt_tokens) == (5, 6)
    assert out.src.dtype == out.tgt_in.dtype == out.tgt_out.dtype == np.int32
    assert out.src_valid_len.dtype == out.tgt_valid_len.dtype == np.float32


def test_empty_source_and_rows_multiple_override() -> None:
    batch = BatchPlan(indices=np.array([2]), src_pad_len=2, tgt_pad_len=2, bucket=0, num_rows=8)
    out = collate(TINY, batch, rows_multiple=2)
    assert out.src.tolist() == [[EOS_ID, PAD_ID], [EOS_ID, PAD_ID]]
    assert out.tgt_out.tolist() == [[12, EOS_ID], [PAD_ID, PAD_ID]]
    assert out.src_valid_len.tolist() == [1, 1] and out.tgt_valid_len.tolist() == [2, 0]


def test_sentence_longer_than_the_batch_is_rejected() -> None:
    batch = BatchPlan(indices=np.array([1]), src_pad_len=8, tgt_pad_len=3, bucket=0, num_rows=8)  # tgt 3 + BOS > 3
    with pytest.raises(DataError, match="does not fit split 'tiny'"):
        collate(TINY, batch)


def test_padding_efficiency_by_hand() -> None:
    plan = BatchPlan(indices=np.array([0, 1, 2]), src_pad_len=4, tgt_pad_len=5, bucket=0, num_rows=8)
    # real: src (2+1)+(1+1)+(0+1) = 6, tgt (1+1)+(3+1)+(1+1) = 8; slots: src 8 * 4 = 32, tgt 8 * 5 = 40
    eff = plan_padding_efficiency([plan], TINY.src_lengths, TINY.tgt_lengths)
    assert (eff.src, eff.tgt, eff.combined) == pytest.approx((6 / 32, 8 / 40, 14 / 72))
    assert plan_padding_efficiency([(plan, plan)], TINY.src_lengths, TINY.tgt_lengths) == eff
    batch = collate(TINY, plan)
    assert (batch.src_slots, batch.tgt_slots) == (32, 40)
    assert padding_efficiency(batch.num_src_tokens, batch.num_tgt_tokens, batch.src_slots, batch.tgt_slots) == eff
    empty = plan_padding_efficiency([], TINY.src_lengths, TINY.tgt_lengths)
    assert (empty.src, empty.tgt, empty.combined) == (0.0, 0.0, 0.0)


def test_collate_matches_the_split_for_every_batch_of_an_epoch() -> None:
    rng = np.random.default_rng(0)
    src = [rng.integers(4, 100, rng.integers(0, 40)).tolist() for _ in range(400)]
    tgt = [rng.integers(4, 100, rng.integers(1, 40)).tolist() for _ in range(400)]
    split = _split(src, tgt)
    stream = BatchStream(split.src_lengths, split.tgt_lengths, max_tokens=512, seed=0, rank=0, num_shards=1)
    for batch in stream.epoch_batches(0):
        out = collate(split, batch)
        assert out.src.shape == (batch.num_rows, batch.src_pad_len)
        assert out.tgt_in.shape == out.tgt_out.shape == (batch.num_rows, batch.tgt_pad_len)
        assert max(out.src.size, out.tgt_in.size) <= 512
        for row, i in enumerate(batch.indices):
            n_src, n_tgt = len(src[i]), len(tgt[i])
            assert out.src[row, :n_src + 1].tolist() == src[i] + [EOS_ID]
            assert out.tgt_in[row, :n_tgt + 1].tolist() == [BOS_ID] + tgt[i]
            assert out.tgt_out[row, :n_tgt + 1].tolist() == tgt[i] + [EOS_ID]
            assert not out.src[row, n_src + 1:].any() and not out.tgt_out[row, n_tgt + 1:].any()
        assert out.num_tgt_tokens == int(out.tgt_valid_len.sum())
