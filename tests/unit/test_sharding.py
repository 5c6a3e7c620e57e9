"""Global steps across ranks: budget, exactly-once, equal per-rank counts, same shape per step, determinism, resume,
world-size independence of train.data_shards, padding efficiency."""
from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest

from dist_nmt.data.batch import BatchPlan, plan_padding_efficiency
from dist_nmt.data.sharding import BatchStream, make_global_batches, next_position

MULTI30K = Path(__file__).resolve().parents[2] / "../shared/data/multi30k"
MAX_LEN = 128


def _word_counts(name: str, limit: int) -> np.ndarray:
    with gzip.open(MULTI30K / "raw" / name, "rt", encoding="utf-8") as fh:
        return np.array([len(line.split()) for line in itertools.islice(fh, limit)])


@pytest.fixture(scope="module", params=["multi30k", "random"])
def lengths(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    """(src, tgt) lengths: real Multi30k word counts x 1.3 (about subwords), or uniform random up to MAX_LEN."""
    if request.param == "multi30k":
        if not MULTI30K.is_dir():
            pytest.skip(f"Multi30k not found at {MULTI30K}")
        src = (_word_counts("train.en.gz", 6000) * 1.3).astype(int)
        return src, (_word_counts("train.de.gz", 6000) * 1.3).astype(int)
    rng = np.random.default_rng(7)
    return rng.integers(0, MAX_LEN + 1, 3000), rng.integers(0, MAX_LEN + 1, 3000)


@pytest.mark.parametrize("num_shards", range(1, 9))
def test_global_step_invariants(lengths: tuple[np.ndarray, np.ndarray], num_shards: int) -> None:
    src, tgt = lengths
    steps = make_global_batches(src, tgt, 4096, num_shards, seed=3, epoch=0)
    flat = [b for step in steps for b in step]
    for step in steps:
        assert len(step) == num_shards
        # same shape class, hence the same (rows, src_len, tgt_len) on every rank
        assert len({(b.bucket, b.num_rows, b.src_pad_len, b.tgt_pad_len) for b in step}) == 1
    for b in flat:
        assert b.num_rows * max(b.src_pad_len, b.tgt_pad_len) <= 4096  # per side, padding and dummy rows included
        assert 0 < len(b) <= b.num_rows
        assert src[b.indices].max() + 1 <= b.src_pad_len and tgt[b.indices].max() + 1 <= b.tgt_pad_len
    all_indices = np.sort(np.concatenate([b.indices for b in flat]))
    assert np.array_equal(all_indices, np.arange(len(src)))  # every sentence exactly once per epoch
    streams = [BatchStream(src, tgt, 4096, seed=3, rank=r, num_shards=num_shards) for r in range(num_shards)]
    assert {s.batches_per_epoch for s in streams} == {len(steps)}
    for rank, stream in enumerate(streams):
        mine = stream.epoch_batches(0)
        assert [b.bucket for b in mine] == [step[0].bucket for step in steps]
        assert all(np.array_equal(b.indices, step[rank].indices) for b, step in zip(mine, steps, strict=True))


def _order(steps: list[tuple[BatchPlan, ...]]) -> np.ndarray:
    return np.concatenate([b.indices for step in steps for b in step])


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(lengths: tuple[np.ndarray, np.ndarray]) -> None:
    src, tgt = lengths
    first = _order(make_global_batches(src, tgt, 4096, 2, seed=1, epoch=0))
    again = _order(make_global_batches(src, tgt, 4096, 2, seed=1, epoch=0))
    next_epoch = _order(make_global_batches(src, tgt, 4096, 2, seed=1, epoch=1))
    other_seed = _order(make_global_batches(src, tgt, 4096, 2, seed=2, epoch=0))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, next_epoch) and not np.array_equal(first, other_seed)
    assert np.array_equal(np.sort(first), np.sort(next_epoch))


def _triples(stream: BatchStream, epoch: int, index: int, count: int) -> list[tuple[int, int, tuple[int, ...]]]:
    items = itertools.islice(stream.iterate(epoch, index), count)
    return [(e, i, tuple(b.indices.tolist())) for e, i, b in items]


def test_resume_at_epoch_and_index_equals_skipping(lengths: tuple[np.ndarray, np.ndarray]) -> None:
    src, tgt = lengths
    stream = BatchStream(src, tgt, 4096, seed=5, rank=1, num_shards=3)
    per_epoch = stream.batches_per_epoch
    from_start = _triples(stream, 0, 0, 3 * per_epoch)
    assert [e for e, _, _ in from_start].count(1) == per_epoch
    for epoch, index in [(0, 0), (0, 7), (1, per_epoch - 2), (2, 3)]:
        skip = epoch * per_epoch + index
        fresh = BatchStream(src, tgt, 4096, seed=5, rank=1, num_shards=3)
        assert _triples(fresh, epoch, index, 5) == from_start[skip:skip + 5]
    assert _triples(stream, 0, per_epoch, 1) == from_start[per_epoch:per_epoch + 1]  # past the end rolls over


def test_next_position_is_the_one_epoch_roll_over() -> None:
    assert next_position(0, 3, 5) == (0, 4)
    assert next_position(0, 4, 5) == (1, 0)  # after the last batch of epoch 0
    assert next_position(1, 12, 5, step=0) == (3, 2)  # an index past the end is normalised
    with pytest.raises(ValueError, match="batches_per_epoch >= 1"):
        next_position(0, 0, 0)


@pytest.mark.parametrize("data_shards", [2, 4])
def test_data_shards_give_the_same_global_batches_on_any_world_size(lengths: tuple[np.ndarray, np.ndarray],
                                                                    data_shards: int) -> None:
    """RunData's layout: rank r of W processes runs shards r * D / W .. (r + 1) * D / W - 1 as micro-batches."""
    src, tgt = lengths

    def global_batches(world_size: int, epoch: int, index: int) -> list[tuple[int, ...]]:
        per_rank = data_shards // world_size
        out = []
        for rank in range(world_size):
            for i in range(per_rank):
                stream = BatchStream(src, tgt, 4096, seed=4, rank=rank * per_rank + i, num_shards=data_shards)
                out.append(tuple(stream.epoch_batches(epoch)[index].indices.tolist()))
        return out

    for epoch, index in [(0, 0), (1, 2)]:
        single = global_batches(1, epoch, index)
        assert all(global_batches(w, epoch, index) == single for w in range(2, data_shards + 1) if data_shards % w == 0)


@pytest.mark.parametrize("num_shards", [1, 2, 8])
def test_per_side_padding_wastes_little_on_multi30k(num_shards: int) -> None:
    if not MULTI30K.is_dir():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    src = (_word_counts("train.en.gz", 6000) * 1.3).astype(int)
    tgt = (_word_counts("train.de.gz", 6000) * 1.3).astype(int)
    eff = plan_padding_efficiency(make_global_batches(src, tgt, 4096, num_shards, seed=0, epoch=0), src, tgt)
    assert min(eff.src, eff.tgt) > 0.85  # one length for both sides (the old buckets) gave ~0.76 on Multi30k


def test_long_pairs_are_planned_and_bad_rank_or_plan_is_rejected() -> None:
    src, tgt = np.array([3, 40, 200, 5]), np.array([4, 41, 180, 6])
    stream = BatchStream(src, tgt, 4096, seed=0, rank=0, num_shards=1)
    assert stream.batches_per_epoch >= 1 and max(stream.plan.src_pad_lens) >= 201
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        BatchStream(src, tgt, 4096, seed=0, rank=2, num_shards=2)
    with pytest.raises(ValueError, match="plan is for 1 shards"):
        BatchStream(src, tgt, 4096, seed=0, rank=0, num_shards=2, plan=stream.plan)


def test_building_an_epoch_of_a_million_sentences_is_fast() -> None:
    rng = np.random.default_rng(0)
    src = np.clip(rng.lognormal(3.0, 0.5, 1_000_000), 1, MAX_LEN).astype(np.int32)
    tgt = np.clip(src + rng.integers(-3, 4, len(src)), 1, MAX_LEN).astype(np.int32)
    stream = BatchStream(src, tgt, 4096, seed=0, rank=0, num_shards=4)
    batches = stream.epoch_batches(0)  # about 0.1 s here; a Python loop per sentence would take ~10 s
    assert sum(len(b) for b in batches) > 200_000 and stream.epoch_batches(0) is batches  # cached
