"""Bucket boundaries, bucket assignment, merging of small buckets and batch row limits (hand-checkable)."""
from __future__ import annotations

import numpy as np
import pytest

from dist_nmt.data.bucketing import assign_buckets, bucket_boundaries, max_rows_for, plan_buckets
from dist_nmt.data.text import DataError


def test_boundaries_cover_max_len_plus_eos() -> None:
    assert bucket_boundaries(128) == list(range(8, 137, 8))  # 128 tokens + EOS = 129 -> 136
    assert bucket_boundaries(7) == [8]
    assert bucket_boundaries(8) == [8, 16]
    assert bucket_boundaries(20, step=5) == [5, 10, 15, 20, 25]


def test_assign_uses_the_longer_side_plus_one() -> None:
    src = np.array([0, 7, 3, 8, 15])
    tgt = np.array([0, 3, 7, 0, 16])
    assert assign_buckets(src, tgt, [8, 16, 24]).tolist() == [0, 0, 0, 1, 2]


def test_pair_longer_than_every_bucket_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"pair 1 \(src 3, tgt 16 tokens\) needs 17 positions .* largest bucket is 16"):
        assign_buckets(np.array([1, 3]), np.array([1, 16]), [8, 16])


def test_max_rows_is_a_multiple_that_fits_the_budget() -> None:
    assert max_rows_for(136, 4096, 8) == 24  # 4096 // 136 = 30 -> 24; 24 * 136 = 3264 <= 4096
    assert max_rows_for(8, 4096, 8) == 512
    assert max_rows_for(136, 4096, 1) == 30
    with pytest.raises(DataError, match="raise train.max_tokens to at least 1088"):
        max_rows_for(136, 1000, 8)


def test_small_buckets_merge_into_the_next_longer_one() -> None:
    # padded lengths: 2 pairs in bucket 8, 10 in bucket 16, none in 24, 1 in bucket 32
    src = np.array([1, 2] + [10] * 10 + [30])
    plan = plan_buckets(src, src, max_tokens=64, num_shards=4, boundaries=[8, 16, 24, 32], rows_multiple=1)
    assert plan.pad_lens == (32,)  # 2 + 10 = 12 >= 4 closes a group at 16; the lone 32 joins it (pads to 32)
    assert plan.buckets == (3,)
    assert plan.max_rows == (2,)  # 64 // 32 = 2 rows
    assert plan.num_batches == (8,)  # ceil(13 / 2) = 7 -> multiple of 4 = 8
    assert plan.group_of.tolist() == [0] * 13
    plan = plan_buckets(src[:12], src[:12], max_tokens=64, num_shards=4, boundaries=[8, 16, 24, 32], rows_multiple=1)
    assert (plan.pad_lens, plan.num_batches, plan.batches_per_shard) == ((16,), (4,), 1)  # 4 rows: ceil(12/4)=3 -> 4


def test_groups_with_enough_sentences_stay_separate() -> None:
    src = np.array([1] * 5 + [10] * 6)
    plan = plan_buckets(src, src, max_tokens=64, num_shards=2, boundaries=[8, 16], rows_multiple=1)
    assert plan.pad_lens == (8, 16)
    assert plan.num_batches == (2, 2)  # 8 rows of L=8 -> 1 batch -> 2; 4 rows of L=16 -> 2 batches
    assert plan.group_of.tolist() == [0] * 5 + [1] * 6


def test_fewer_sentences_than_shards_is_an_error() -> None:
    with pytest.raises(DataError, match="only 3 sentences for num_shards=4"):
        plan_buckets(np.array([1, 2, 3]), np.array([1, 2, 3]), 4096, num_shards=4, boundaries=[8])
    with pytest.raises(DataError, match="only 0 sentences"):
        plan_buckets(np.array([], dtype=int), np.array([], dtype=int), 4096, num_shards=1, boundaries=[8])


def test_too_few_sentences_for_one_row_batches_on_every_rank() -> None:
    with pytest.raises(DataError, match="cannot split 5 sentences .* num_shards=4"):
        plan_buckets(np.full(5, 3), np.full(5, 3), max_tokens=8, num_shards=4, boundaries=[8], rows_multiple=1)
