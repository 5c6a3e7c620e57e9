"""Shape classes: the length grid, per-side padding, when classes split or merge, batch sizing (hand-checkable)."""
from __future__ import annotations

import numpy as np
import pytest

from dist_nmt.data.bucketing import grid_length, max_rows_for, plan_buckets
from dist_nmt.data.text import DataError


def test_grid_is_exact_for_short_needs_and_coarser_for_long_ones() -> None:
    assert grid_length(np.arange(1, 33)).tolist() == list(range(1, 33))
    assert grid_length(np.array([33, 34, 63, 64, 65, 128, 129, 130])).tolist() == [34, 34, 64, 64, 68, 128, 136, 136]


def test_max_rows_is_a_multiple_that_fits_the_budget() -> None:
    assert max_rows_for(136, 4096, 8) == 24  # 4096 // 136 = 30 -> 24; 24 * 136 = 3264 <= 4096
    assert max_rows_for(136, 4096, 1) == 30
    with pytest.raises(DataError, match="raise train.max_tokens to at least 1088"):
        max_rows_for(136, 1000, 8)


def test_each_side_is_padded_to_its_own_length() -> None:
    # 6 pairs of 4 source and 19 target tokens: source needs 5 (EOS), target 20 (BOS / EOS)
    plan = plan_buckets(np.full(6, 4), np.full(6, 19), max_tokens=64, num_shards=1)
    assert plan.shapes == [(3, 5, 20)]  # 64 // max(5, 20) = 3 rows -> 2 batches of 3
    assert plan.num_batches == (2,) and plan.group_of.tolist() == [0] * 6


def test_distant_lengths_get_their_own_classes() -> None:
    # together: 200 rows of 31 + 11 = 8400 slots; apart: 100 * 8 + 100 * 42 = 5000 slots
    src = np.array([3] * 100 + [30] * 100)
    tgt = np.array([3] * 100 + [10] * 100)
    plan = plan_buckets(src, tgt, max_tokens=4096, num_shards=1)
    assert plan.shapes == [(100, 4, 4), (100, 31, 11)]
    assert plan.group_of.tolist() == [0] * 100 + [1] * 100


def test_near_lengths_share_a_shape_when_a_new_one_does_not_pay() -> None:
    # apart saves 100 slots (2400 -> 2300) but costs one more batch (0.03 * 4096 = 123 slots): one class
    src = np.array([10] * 50 + [11] * 50)
    plan = plan_buckets(src, src, max_tokens=4096, num_shards=1)
    assert plan.shapes == [(100, 12, 12)]


@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_classes_fit_the_budget_and_split_into_shard_multiples(num_shards: int) -> None:
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(0, 100, 5000), rng.integers(0, 100, 5000)
    plan = plan_buckets(src, tgt, max_tokens=2048, num_shards=num_shards)
    counts = np.bincount(plan.group_of, minlength=len(plan.rows))
    for g, (rows, src_pad, tgt_pad) in enumerate(plan.shapes):
        assert rows * max(src_pad, tgt_pad) <= 2048  # per side: neither side's padded slots exceed max_tokens
        assert plan.num_batches[g] % num_shards == 0 and plan.num_batches[g] <= counts[g] <= plan.num_batches[g] * rows
    assert (np.array(plan.src_pad_lens)[plan.group_of] >= src + 1).all()
    assert (np.array(plan.tgt_pad_lens)[plan.group_of] >= tgt + 1).all()
    assert 1 < len(plan.rows) < 80  # a few dozen shapes, not one per (src, tgt) cell


def test_fewer_sentences_than_shards_is_an_error() -> None:
    with pytest.raises(DataError, match="only 3 sentences for num_shards=4"):
        plan_buckets(np.array([1, 2, 3]), np.array([1, 2, 3]), 4096, num_shards=4)
    with pytest.raises(DataError, match="only 0 sentences"):
        plan_buckets(np.array([], dtype=int), np.array([], dtype=int), 4096, num_shards=1)


def test_too_few_sentences_for_one_row_batches_on_every_rank() -> None:
    # 5 pairs needing 8 positions under max_tokens=8: 1 row each -> 5 batches, not a multiple of 4 shards
    with pytest.raises(DataError, match="cannot split 5 sentences .* num_shards=4"):
        plan_buckets(np.full(5, 7), np.full(5, 7), max_tokens=8, num_shards=4, rows_multiple=1)
    with pytest.raises(DataError, match="raise train.max_tokens to at least 42"):  # 40 + EOS = 41 -> grid 42
        plan_buckets(np.full(5, 40), np.full(5, 3), max_tokens=32, num_shards=1)
