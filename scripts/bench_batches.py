"""Trainer step speed on real Multi30k batches: the old bucketing (both sides padded to one length) vs shape classes.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_batches.py --prepared data-bin/multi30k-8k
    .venv/bin/python scripts/bench_batches.py --prepared DIR --config configs/tiny.yaml --steps 2 --max-shapes 2

Both schemes plan epoch 0 of the prepared train split on one rank (`--max-tokens`, default 4096). Each step is the
trainer's own `train_step` (forward, label-smoothed loss, backward, all-reduce, clip, Adam) on the collated batch, the
model built and hybridized as the trainer does. Two phases, printed as one JSON object:

1. Graph building per new shape: for up to `--max-shapes` distinct shapes of each scheme, the first step at the
   shape and an immediate second step at it; `build_sec` = first - second (shape inference, memory re-planning,
   new oneDNN primitives), and the estimated once-per-run cost = median build_sec x distinct shapes.
2. Throughput: `--steps` batches of each scheme in epoch order, alternating old/new step by step (load from other
   processes hits both alike), every shape already built. Real tokens/s = (src + tgt tokens, EOS included) / seconds.

`legacy_plan` keeps the old planner (1-D buckets of max(src_len, tgt_len) + 1 every 8 tokens, small buckets merged
upward, rows a multiple of 8) only here, for this comparison; the library has one planner.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the trainer's process set-up (tcmalloc, threads) before MXNet is imported
    from dist_nmt import environment

    environment.init([__file__, *sys.argv[1:]])

import mxnet as mx
import numpy as np

from dist_nmt import allocator, distributed
from dist_nmt.config import load_config
from dist_nmt.data import BatchStream, EncodedSplit, Vocab, collate, padding_efficiency, vocab_path
from dist_nmt.data.bucketing import BucketPlan, max_rows_for
from dist_nmt.step import train_step
from dist_nmt.train import build_model_for, make_optimizer, uses_fused_ops

ROOT = Path(__file__).resolve().parents[1]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, multiple: int) -> int:
    return _ceil_div(a, multiple) * multiple


def legacy_plan(src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, num_shards: int = 1,
                step: int = 8, rows_multiple: int = 8):
    """The pre-issue-12 plan as a BucketPlan: both sides padded to the pair's bucket of max(src, tgt) + 1."""
    need = np.maximum(src_lengths, tgt_lengths).astype(np.int64) + 1
    boundaries = np.arange(step, -(-int(need.max()) // step) * step + 1, step)
    counts = np.bincount(np.searchsorted(boundaries, need), minlength=len(boundaries))
    groups, pending = [], []
    for b in np.flatnonzero(counts):
        pending.append(int(b))
        if counts[pending].sum() >= num_shards:
            groups, pending = groups + [pending], []
    if pending:
        groups[-1].extend(pending)
    group_of_bucket = np.zeros(len(boundaries), np.int16)
    pads, rows, batches = [], [], []
    for g, members in enumerate(groups):
        group_of_bucket[members] = g
        pad, count = int(boundaries[members[-1]]), int(counts[members].sum())
        max_rows = max_rows_for(pad, max_tokens, rows_multiple)
        k = _round_up(_ceil_div(count, max_rows), num_shards)
        pads.append(pad)
        rows.append(_round_up(_ceil_div(count, k), rows_multiple))
        batches.append(k)
    return BucketPlan(group_of=group_of_bucket[np.searchsorted(boundaries, need)], src_pad_lens=tuple(pads),
                      tgt_pad_lens=tuple(pads), rows=tuple(rows), num_batches=tuple(batches), num_shards=num_shards)


class Stepper:
    """The trainer's model, optimizer and step for `cfg`, on CPU, one process."""

    def __init__(self, cfg, vocab_size: int) -> None:
        distributed.init_world(cfg.dist)
        self.cfg, self.ctx = cfg, mx.cpu()
        self.model = build_model_for(cfg, vocab_size, self.ctx)  # the trainer's own construction
        self.trainer = make_optimizer(cfg, self.model)
        self.fused_loss = uses_fused_ops(cfg, self.ctx)

    def step(self, batch) -> float:
        """Seconds for one trainer step on `batch` (synchronised)."""
        start = time.perf_counter()
        train_step(self.model, self.trainer, [batch], self.ctx, 1.0, self.cfg.optim, float(batch.num_tgt_tokens),
                   self.fused_loss)
        mx.nd.waitall()
        return time.perf_counter() - start


def shape_build_costs(stepper: Stepper, train, plans: list, max_shapes: int) -> dict:
    """First vs immediate second step at each of up to max_shapes new shapes."""
    seen, rows = set(), []
    for plan in plans:
        shape = (plan.num_rows, plan.src_pad_len, plan.tgt_pad_len)
        if shape in seen or len(seen) >= max_shapes:
            continue
        seen.add(shape)
        batch = collate(train, plan)
        first, second = stepper.step(batch), stepper.step(batch)
        rows.append({"shape": shape, "first_sec": round(first, 4), "second_sec": round(second, 4),
                     "build_sec": round(first - second, 4)})
    distinct = len({(p.num_rows, p.src_pad_len, p.tgt_pad_len) for p in plans})
    median = statistics.median(r["build_sec"] for r in rows)
    return {"distinct_shapes_per_epoch": distinct, "median_build_sec": round(median, 4),
            "estimated_build_sec_per_run": round(median * distinct, 2), "measured": rows}


def build_all(stepper: Stepper, train, plans: list) -> None:
    """One step at every distinct shape of `plans`, so the timed phase reuses built graphs."""
    done = set()
    for plan in plans:
        shape = (plan.num_rows, plan.src_pad_len, plan.tgt_pad_len)
        if shape not in done:
            done.add(shape)
            stepper.step(collate(train, plan))


def throughput(stepper: Stepper, train, schemes: dict[str, list], steps: int) -> dict:
    """Real tokens/s of each scheme's first `steps` batches, alternating schemes step by step."""
    seconds = {name: 0.0 for name in schemes}
    counts = {name: np.zeros(4) for name in schemes}
    for i in range(steps):
        for name, plans in schemes.items():
            batch = collate(train, plans[i % len(plans)])
            seconds[name] += stepper.step(batch)
            counts[name] += [batch.num_src_tokens, batch.num_tgt_tokens, batch.src_slots, batch.tgt_slots]
    out = {}
    for name in schemes:
        eff = padding_efficiency(*counts[name])
        out[name] = {"real_tokens_per_s": round(counts[name][:2].sum() / seconds[name], 1),
                     "sec_per_step": round(seconds[name] / steps, 4), "steps": steps,
                     "padding_efficiency": {"src": round(eff.src, 4), "tgt": round(eff.tgt, 4)}}
    out["speedup_real_tokens_per_s"] = round(out["shape_classes"]["real_tokens_per_s"]
                                             / out["legacy"]["real_tokens_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run both phases and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="prepared data directory (dist-nmt prepare)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "multi30k.yaml"),
                        help="config whose model/optim/precision sections build the trainer (default: the main job)")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per scheme")
    parser.add_argument("--max-shapes", type=int, default=6, help="new shapes timed per scheme in phase 1")
    parser.add_argument("--shape-cost-only", action="store_true", help="phase 1 only")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [f"data.prepared_dir={args.prepared}"])
    train = EncodedSplit.load(args.prepared, "train")
    src, tgt = train.src_lengths, train.tgt_lengths
    plans = {"legacy": legacy_plan(src, tgt, args.max_tokens), "shape_classes": None}
    schemes = {name: BatchStream(src, tgt, args.max_tokens, seed=1, rank=0, num_shards=1, plan=plan).epoch_batches(0)
               for name, plan in plans.items()}
    stepper = Stepper(cfg, Vocab.load(vocab_path(args.prepared)).size)
    result = {"config": args.config, "arch": cfg.model.arch, "max_tokens": args.max_tokens,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "allocator": allocator.status(),
              "batches_per_epoch": {name: len(p) for name, p in schemes.items()},
              "graph_building": {name: shape_build_costs(stepper, train, p, args.max_shapes)
                                 for name, p in schemes.items()}}
    if not args.shape_cost_only:
        for plans_of_scheme in schemes.values():
            build_all(stepper, train, plans_of_scheme[:args.steps])
        result["throughput"] = throughput(stepper, train, schemes, args.steps)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
