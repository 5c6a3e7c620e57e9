"""Benchmark the data pipeline on Multi30k and print one JSON object.

    .venv/bin/python scripts/bench_data.py                       # corpus at ../shared/data/multi30k
    .venv/bin/python scripts/bench_data.py --root /path/to/multi30k --epochs 3

Measures: a fresh prepare (vocab 8000) into a temp dir; batches/s of the batching pipeline on train (building each
epoch's batch list + collating every batch); padding efficiency per side and combined (dist_nmt.data.padding_efficiency,
the trainer's formula), batches per rank and distinct (rows, src_len, tgt_len) shapes per epoch at max_tokens 4096
with 1, 2 and 8 shards; and the time to plan and to build one epoch's batch list for 4.5M synthetic pairs over 8
shards (WMT14 en-de size).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_nmt.config import DataConfig
from dist_nmt.data import BatchStream, EncodedSplit, collate, padding_efficiency, plan_padding_efficiency, prepare

REPO = Path(__file__).resolve().parents[1]


def bench_batching(train: EncodedSplit, max_tokens: int, epochs: int) -> dict:
    """Batches/s of BatchStream + collate over `epochs` epochs on one rank, and the collated batches' efficiency."""
    start = time.perf_counter()
    stream = BatchStream(train.src_lengths, train.tgt_lengths, max_tokens, seed=1, rank=0, num_shards=1)
    counts = np.zeros(4)  # real src, real tgt, src slots, tgt slots
    num_batches = 0
    for epoch in range(epochs):
        for plan in stream.epoch_batches(epoch):
            batch = collate(train, plan)
            num_batches += 1
            counts += [batch.num_src_tokens, batch.num_tgt_tokens, batch.src_slots, batch.tgt_slots]
    seconds = time.perf_counter() - start
    eff = padding_efficiency(*counts)
    return {"batches_per_s": round(num_batches / seconds, 1), "real_tokens_per_s": round(counts[:2].sum() / seconds),
            "batches_per_epoch": stream.batches_per_epoch, "epochs": epochs,
            "collated_padding_efficiency": {"src": round(eff.src, 4), "tgt": round(eff.tgt, 4),
                                            "combined": round(eff.combined, 4)}}


def efficiency(train: EncodedSplit, max_tokens: int, num_shards: int) -> dict:
    """Padding efficiency of epoch 0 over all ranks, batches per rank and distinct (rows, src, tgt) shapes."""
    streams = [BatchStream(train.src_lengths, train.tgt_lengths, max_tokens, seed=1, rank=r, num_shards=num_shards)
               for r in range(num_shards)]
    batches = [b for s in streams for b in s.epoch_batches(0)]
    eff = plan_padding_efficiency(batches, train.src_lengths, train.tgt_lengths)
    shapes = {(b.num_rows, b.src_pad_len, b.tgt_pad_len) for b in batches}
    return {"padding_efficiency": {"src": round(eff.src, 4), "tgt": round(eff.tgt, 4),
                                   "combined": round(eff.combined, 4)},
            "batches_per_rank": streams[0].batches_per_epoch, "distinct_shapes_per_epoch": len(shapes),
            "shapes": sorted(shapes)}


def bench_large_epoch(num_sentences: int, num_shards: int, max_len: int) -> dict:
    """Seconds to plan buckets and to build one epoch's batch list for synthetic WMT-sized lengths."""
    rng = np.random.default_rng(0)
    src = np.clip(rng.lognormal(3.2, 0.55, num_sentences), 1, max_len).astype(np.int32)
    tgt = np.clip(src + rng.integers(-4, 5, num_sentences), 1, max_len).astype(np.int32)
    start = time.perf_counter()
    stream = BatchStream(src, tgt, 4096, seed=1, rank=0, num_shards=num_shards)
    plan_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stream.epoch_batches(0)
    return {"sentences": num_sentences, "num_shards": num_shards, "plan_seconds": round(plan_seconds, 3),
            "distinct_shapes": len(stream.plan.rows), "batches_per_rank": stream.batches_per_epoch,
            "epoch_batches_seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    """Run every measurement and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / "../shared/data/multi30k"), help="Multi30k directory")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for the batches/s measurement")
    parser.add_argument("--large-sentences", type=int, default=4_500_000, help="synthetic pairs for the planning time")
    args = parser.parse_args()
    data = DataConfig(root=args.root)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = prepare(data, Path(tmp) / "multi30k")
        prepare_seconds = time.perf_counter() - start
        start = time.perf_counter()
        prepare(data, Path(tmp) / "multi30k")
        noop_seconds = time.perf_counter() - start
        train = EncodedSplit.load(Path(tmp) / "multi30k", "train")
        result = {
            "prepare_seconds_fresh": round(prepare_seconds, 3),
            "prepare_seconds_noop": round(noop_seconds, 4),
            "vocab_size": report["vocab_size"],
            "train_pairs": len(train),
            "train_src_len": report["splits"]["train"]["src_len"],
            "train_tgt_len": report["splits"]["train"]["tgt_len"],
            "batching_max_tokens_4096": bench_batching(train, 4096, args.epochs),
            "efficiency_max_tokens_4096": {f"{n}_shards": efficiency(train, 4096, n) for n in (1, 2, 8)},
            "large_epoch": bench_large_epoch(args.large_sentences, 8, data.max_len),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
