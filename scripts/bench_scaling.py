"""Weak-scaling benchmark: np=1 vs np=2 Horovod workers (1 OpenMP thread each) on random batches; prints JSON.

    python scripts/bench_scaling.py                                  # tiny and transformer_base presets
    python scripts/bench_scaling.py --presets transformer_base --updates 12 --batch-sentences 64

For each preset and world size it reports global real tokens/s (source + target), scaling efficiency
(tokens/s at np=2 / (2 × tokens/s at np=1)), the mean time per update spent in the gradient all-reduce, and the
bytes all-reduced per update (fp32 gradients of every trainable parameter). Each worker runs the trainer's own
update (`dist_nmt.step.train_step`: forward, backward, all-reduce, norm, clipping, update, with the model and
DistributedTrainer built by `dist_nmt.train`); dist_nmt.distributed also sets Horovod's cycle time
(`dist.cycle_time_ms`, 10 ms on CPU; export HOROVOD_CYCLE_TIME to compare others).
`--pin` binds local rank r to core r, as `mpirun --bind-to core` does.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One Horovod worker: time `args.updates` trainer updates (`dist_nmt.step.train_step`) after warm-up."""
    import mxnet as mx
    import numpy as np

    from dist_nmt import allocator, distributed
    from dist_nmt.config import load_config
    from dist_nmt.data import random_batch
    from dist_nmt.step import train_step
    from dist_nmt.train import build_model_for, make_optimizer, uses_fused_ops

    if args.pin:  # one core per worker: local rank r runs on core r (no migrations, no shared L2)
        os.sched_setaffinity(0, {int(os.environ.get("HOROVOD_LOCAL_RANK", "0")) % os.cpu_count()})
    world = distributed.init_world()
    cfg = load_config(ROOT / "configs" / "models" / f"{args.preset}.yaml", ["train.max_updates=1"])
    model = build_model_for(cfg, args.vocab, mx.cpu())
    trainer = make_optimizer(cfg, model)
    fused_loss = uses_fused_ops(cfg, mx.cpu())
    batch = random_batch(args.batch_sentences, args.seq_len, args.seq_len, args.vocab, seed=world.rank)
    comm = [0.0]
    reduce = distributed.reduced_grads

    def timed_reduce(trainer):  # the all-reduce share of an update: wait for backward, then for the collective
        mx.nd.waitall()
        t0 = time.perf_counter()
        grads = reduce(trainer)
        mx.nd.waitall()
        comm[0] += time.perf_counter() - t0
        return grads

    distributed.reduced_grads = timed_reduce  # step.train_step calls it through the module
    total = 0.0
    for step in range(args.warmup + args.updates):
        if step == args.warmup:
            comm[0] = 0.0
        t0 = time.perf_counter()
        train_step(model, trainer, [batch], mx.cpu(), 1.0, cfg.optim, batch.num_tgt_tokens * world.size, fused_loss)
        mx.nd.waitall()
        if step >= args.warmup:
            total += time.perf_counter() - t0
    grads = [p for p in model.collect_params().values() if p.grad_req != "null"]
    num_grad_bytes = sum(int(np.prod(p.shape)) * 4 for p in grads)
    if world.is_primary:
        tokens = 2 * args.batch_sentences * args.seq_len * world.size * args.updates
        print("RESULT " + json.dumps({
            "preset": args.preset, "np": world.size, "global_tokens_per_s": round(tokens / total, 1),
            "seconds_per_update": round(total / args.updates, 4),
            "allreduce_seconds_per_update": round(comm[0] / args.updates, 4),
            "allreduce_bytes_per_update": num_grad_bytes if world.size > 1 else 0,
            "allocator": allocator.status(), "pinned": args.pin,
            "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME")}), flush=True)


def launch(preset: str, num_procs: int, args: argparse.Namespace) -> dict:
    """Run `num_procs` workers under horovodrun (Gloo) and return rank 0's result."""
    cmd = [str(ROOT / ".venv" / "bin" / "horovodrun"), "-np", str(num_procs), "-H", f"localhost:{num_procs}",
           "--gloo", sys.executable, __file__, "--worker", "--preset", preset, "--updates", str(args.updates),
           "--warmup", str(args.warmup), "--batch-sentences", str(args.batch_sentences),
           "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), *(["--pin"] if args.pin else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(next(line for line in out.splitlines() if "RESULT " in line).split("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "transformer_base"])
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-sentences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=25)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--pin", action="store_true", help="pin each worker to one core (local rank)")
    args = parser.parse_args()
    if args.worker:
        from dist_nmt import environment

        environment.init([__file__, *sys.argv[1:]])  # what the trainer runs on: tcmalloc, threads
        worker(args)
        return
    results = []
    for preset in args.presets:
        one, two = launch(preset, 1, args), launch(preset, 2, args)
        results.append({"preset": preset, "np1": one, "np2": two,
                        "weak_scaling_efficiency": round(two["global_tokens_per_s"]
                                                         / (2 * one["global_tokens_per_s"]), 3)})
    print(json.dumps({"benchmark": "weak_scaling", "threads_per_process": 1,
                      "batch": [args.batch_sentences, args.seq_len], "results": results}, indent=1))


if __name__ == "__main__":
    main()
