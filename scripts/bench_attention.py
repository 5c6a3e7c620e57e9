"""The Transformer's attention implementations side by side: one attention block forward + backward, and a whole
training step, for each of `batch_dot`, `fused` (the dist_nmt.ops C++ core) and `interleaved` (MXNet's
`_contrib_interleaved_matmul_*` ops), alternating in one process.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_attention.py --preset transformer_base \
        --batch-sentences 128 --seq-len 25 --steps 10 --block-steps 50
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_attention.py --preset tiny --steps 2 --block-steps 3  # smoke

Blocks (transformer_base sizes from the preset: D, H), B = --batch-sentences, T = S = --seq-len:
- `enc_self`: self-attention with per-sentence valid lengths (a length mask, lengths uniform in [T/2, T]);
- `dec_self`: self-attention with the causal mask;
- `cross`: encoder-decoder attention with the source length mask.
Each timed call is forward + backward of the block (projections included, as the model runs it) into a fixed
random head gradient. The interleaved block gets time-major inputs prepared outside the timing: in the model the
whole stack runs time-major, and the two transposes per stack that this costs are inside the full step below.

Full step: `dist_nmt.step.train_step` on the model `dist_nmt.train.build_model_for` builds with
`model.attention_impl=<impl>` (everything else as the preset says, fused_ops=auto for all, so residual + LayerNorm
are the same on every candidate), exactly one training update as scripts/bench_train.py times it.

Candidates alternate call by call (load from other processes hits all alike); the best and the median wall time
and the best process-CPU time are reported per candidate, plus each one's ratio to `batch_dot`. `fused` is left
out (and said so) when the library does not load. `--impls` picks a subset (each full-step model holds its own
parameters and Adam state: transformer_base needs ~1 GB per candidate). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

if __name__ == "__main__":  # the trainer's process set-up (tcmalloc, threads) before MXNet is imported
    from dist_nmt import environment

    environment.init([__file__, *sys.argv[1:]])

import mxnet as mx
import numpy as np
from bench_train import add_step_args, preset_config, time_alternating, trainer_step
from mxnet import autograd

from dist_nmt import allocator, distributed, ops
from dist_nmt.data import random_batch
from dist_nmt.models import ATTENTION_IMPLS
from dist_nmt.models.attention import CrossAttention, SelfAttention, head_lengths
from dist_nmt.train import build_model_for

BLOCKS = ("enc_self", "dec_self", "cross")


def block_inputs(kind: str, batch: int, seq_len: int, d_model: int, num_heads: int, seed: int = 0):
    """Batch-major inputs [x (B, T, D)] or [x, mem (B, S, D)], lengths (B*H, T) int32, head gradient (B, T, D)."""
    rng = np.random.RandomState(seed)
    x = mx.nd.array(rng.randn(batch, seq_len, d_model))
    grad = mx.nd.array(rng.randn(batch, seq_len, d_model))
    if kind == "dec_self":
        per_query = np.tile(np.arange(1, seq_len + 1), (batch, 1))  # causal: query t sees keys 0..t
    else:
        per_row = rng.randint(max(1, seq_len // 2), seq_len + 1, size=(batch, 1))
        per_query = np.repeat(per_row, seq_len, axis=1)
    lengths = head_lengths(mx.nd, mx.nd.array(per_query), num_heads)
    inputs = [x, mx.nd.array(rng.randn(batch, seq_len, d_model))] if kind == "cross" else [x]
    return inputs, lengths, grad


def block_step(kind: str, impl: str, hp, batch: int, seq_len: int):
    """A closure running forward + backward of one attention block built for `impl` (parameters seeded alike)."""
    cls = CrossAttention if kind == "cross" else SelfAttention
    mx.random.seed(0)
    block = cls(hp.d_model, hp.num_heads, hp.attention_dropout, prefix=f"{kind}_{impl}_", impl=impl)
    block.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3))
    block.hybridize(static_alloc=True)
    inputs, lengths, grad = block_inputs(kind, batch, seq_len, hp.d_model, hp.num_heads)
    if impl == "interleaved":  # the stack is time-major on this path; its transposes are counted in the full step
        inputs, grad = [x.transpose((1, 0, 2)).copy() for x in inputs], grad.transpose((1, 0, 2)).copy()
    for x in inputs:
        x.attach_grad()

    def step() -> None:
        with autograd.record():
            out = block(*inputs, lengths)
        out.backward(grad)
        mx.nd.waitall()

    return step


def summarise(wall: dict, cpu: dict, baseline: str = "batch_dot") -> dict:
    """Best/median wall and best CPU seconds per candidate, and the ratio of batch_dot's best to each one's."""
    out = {}
    for name in wall:
        out[name] = {"sec_best": round(min(wall[name]), 5), "sec_median": round(statistics.median(wall[name]), 5),
                     "cpu_sec_best": round(min(cpu[name]), 5)}
    if baseline in wall:
        for name in wall:
            out[name]["speedup_vs_batch_dot"] = round(min(wall[baseline]) / min(wall[name]), 3)
            out[name]["speedup_vs_batch_dot_median"] = round(
                statistics.median(wall[baseline]) / statistics.median(wall[name]), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=10, steps_help="timed full training steps per candidate")
    parser.add_argument("--block-steps", type=int, default=50, help="timed block calls per candidate and block")
    parser.add_argument("--impls", default=",".join(ATTENTION_IMPLS), help="comma-separated subset")
    parser.add_argument("--no-full-step", action="store_true", help="time the attention blocks only")
    parser.add_argument("overrides", nargs="*", help="config overrides for every model, e.g. model.fused_ops=off")
    args = parser.parse_args(argv)

    distributed.init_world()
    cfg = preset_config(args.preset, tuple(args.overrides))
    hp = cfg.model.transformer
    fused = ops.resolve(cfg.model.fused_ops)  # loads the library (before any model is built)
    impls = [i for i in args.impls.split(",") if i]
    skipped = {}
    if "fused" in impls and not fused:
        impls.remove("fused")
        skipped["fused"] = ops.unavailable_reason() or "model.fused_ops=off"
    result = {"preset": args.preset, "overrides": args.overrides, "impls": impls, "skipped": skipped,
              "fused_ops": fused, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "allocator": allocator.status(), "batch_sentences": args.batch_sentences, "seq_len": args.seq_len,
              "d_model": hp.d_model, "num_heads": hp.num_heads, "blocks": {}}
    for kind in BLOCKS:
        steps = {impl: block_step(kind, impl, hp, args.batch_sentences, args.seq_len) for impl in impls}
        wall, cpu = time_alternating(steps, args.block_steps, args.warmup)
        result["blocks"][kind] = summarise(wall, cpu)
    if not args.no_full_step:
        batch = random_batch(args.batch_sentences, args.seq_len, args.seq_len, args.vocab)
        steps = {}
        for impl in impls:
            impl_cfg = preset_config(args.preset, (*args.overrides, f"model.attention_impl={impl}"))
            steps[impl] = trainer_step(impl_cfg, build_model_for(impl_cfg, args.vocab, mx.cpu()), batch)
        start = time.perf_counter()
        wall, cpu = time_alternating(steps, args.steps, args.warmup)
        num_tokens = 2 * args.batch_sentences * args.seq_len
        full = summarise(wall, cpu)
        for impl in impls:
            full[impl]["tokens_per_sec"] = round(num_tokens / full[impl]["sec_best"], 1)
        result.update(full_step=full, tokens_per_step=num_tokens, timed_steps=args.steps,
                      full_step_wall_sec=round(time.perf_counter() - start, 1))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
