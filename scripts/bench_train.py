"""Training throughput of a dist_nmt model preset, side by side with GluonNLP 0.10's Transformer.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_train.py --preset transformer_base \
        --batch-sentences 128 --seq-len 25
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_train.py --preset tiny --steps 3 --no-reference
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_train.py --preset transformer_base model.fused_ops=off

One step = forward + label-smoothed cross-entropy + backward + Adam update on a random batch (every sentence
`--seq-len` real tokens), hybridized with static_alloc. Tokens/s counts source + target tokens. Candidates
alternate step by step, and the best step time is reported (plus the median and the process CPU time, the
steadier measure when other processes share the cores):

- `ours`: the trainer's own code: the model as `dist_nmt.train.build_model_for` builds it, the optimizer of
  `dist_nmt.train.make_optimizer` (Horovod's DistributedTrainer, a world of one) and `dist_nmt.step.train_step`
  (loss, gradient norm, clipping, update) — exactly what one training update runs.
- `reference`: GluonNLP 0.10's training step as its scripts/machine_translation/train_transformer.py runs it:
  NMTModel from get_transformer_encoder_decoder, LabelSmoothing(units=V) and MaskedSoftmaxCELoss(sparse_label=False).
- `reference_model`: the same GluonNLP model under our step (`dist_nmt.step.train_step`): the model-only comparison.

Achieved GFLOP/s is an analytic count (matrix products only, backward = 2x forward) over the best step time, given
as a fraction of the FullyConnected fp32 peak measured in the same run (4096x1024x4096). The process runs on
tcmalloc like the trainer (dist_nmt/allocator.py); every candidate shares it. `peak_rss_mb` is the process's
high-water resident memory (getrusage): the model's own peak with `--no-reference`. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the trainer's process set-up (tcmalloc, threads) before MXNet is imported
    from dist_nmt import environment

    environment.init([__file__, *sys.argv[1:]])

import mxnet as mx
from mxnet import autograd, gluon

from dist_nmt import allocator, distributed, environment, ops
from dist_nmt.config import Config, load_for_one_step
from dist_nmt.data import Batch, random_batch
from dist_nmt.precision import check_precision
from dist_nmt.step import train_step
from dist_nmt.train import build_model_for, make_optimizer, resolve_precision, uses_fused_ops

ROOT = Path(__file__).resolve().parents[1]


def preset_config(preset: str, overrides: tuple[str, ...] = ()) -> Config:
    """`transformer_base` (a name in configs/models/) or a YAML path -> a whole Config (defaults elsewhere)."""
    path = Path(preset)
    if not path.suffix:
        path = ROOT / "configs" / "models" / f"{preset}.yaml"
    return load_for_one_step(path, overrides)


def fc_peak_gflops(reps: int = 10) -> float:
    """Measured FullyConnected fp32 throughput on a 4096x1024 @ 1024x4096 product (into a preallocated output,
    so page faults of a fresh 64 MB result do not count)."""
    x, w = mx.nd.random.uniform(shape=(4096, 1024)), mx.nd.random.uniform(shape=(4096, 1024))
    out = mx.nd.zeros((4096, 4096))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        mx.nd.FullyConnected(x, w, no_bias=True, num_hidden=4096, out=out).wait_to_read()
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 1024 * 4096 / best / 1e9


def transformer_gflop_per_batch(hp, batch: int, src_len: int, tgt_len: int, vocab: int) -> float:
    """Matrix-product FLOPs of one training step (forward x 3) for a Transformer."""
    d, f = hp.d_model, hp.d_ff
    layer = 2 * (4 * d * d + 2 * d * f)  # attention projections + FFN, per token
    enc = hp.num_enc_layers * batch * src_len * (layer + 4 * src_len * d)
    dec = hp.num_dec_layers * batch * (tgt_len * (layer + 4 * d * d + 4 * tgt_len * d + 4 * src_len * d)
                                       + src_len * 4 * d * d)
    proj = 2 * batch * tgt_len * d * vocab
    return 3 * (enc + dec + proj) / 1e9


def gnmt_gflop_per_batch(hp, batch: int, src_len: int, tgt_len: int, vocab: int) -> float:
    """Matrix-product FLOPs of one training step (forward x 3) for GNMT (dist_nmt/models/gnmt.py wiring)."""
    h, e = hp.hidden_size, hp.embed_size

    def lstm(inputs: int, hidden: int) -> int:  # per token
        return 2 * 4 * hidden * (inputs + hidden)

    enc = 0
    for i in range(hp.num_enc_layers):
        inputs = e if i == 0 else h
        enc += 2 * lstm(inputs, h // 2) if i < hp.num_bi_layers else lstm(inputs, h)
    enc += 2 * h * h  # attention key projection, once per source token
    dec = lstm(e, h) + (hp.num_dec_layers - 1) * lstm(2 * h, h)
    dec += 2 * h * h + src_len * (2 * h + 2 * h)  # query projection; scores and context over the source
    proj = 2 * h * vocab
    return 3 * batch * (src_len * enc + tgt_len * (dec + proj)) / 1e9


def gluonnlp_loss(vocab: int):
    """GluonNLP 0.10's training loss, as in its train_transformer.py: dense label smoothing + masked softmax CE."""
    from gluonnlp.loss import LabelSmoothing, MaskedSoftmaxCELoss

    smoothing, loss = LabelSmoothing(epsilon=0.1, units=vocab), MaskedSoftmaxCELoss(sparse_label=False)
    smoothing.hybridize(static_alloc=True)
    loss.hybridize(static_alloc=True)
    return lambda logits, labels, valid_len, epsilon: loss(logits, smoothing(labels), valid_len).sum()


def trainer_step(cfg: Config, model, batch: Batch):
    """A closure running one update exactly as the trainer does (`dist_nmt.step.train_step`) on `batch`."""
    trainer, fused_loss = make_optimizer(cfg, model), uses_fused_ops(cfg, mx.cpu())

    def step() -> None:
        train_step(model, trainer, [batch], mx.cpu(), 1.0, cfg.optim, batch.num_tgt_tokens, fused_loss)
        mx.nd.waitall()

    return step


def gluonnlp_step(forward, params, batch: Batch, vocab: int):
    """GluonNLP 0.10's own training step (its loss, gluon Trainer) on `batch`."""
    trainer = gluon.Trainer(params, "adam", {"learning_rate": 1e-4, "beta2": 0.98, "epsilon": 1e-9})
    loss_fn = gluonnlp_loss(vocab)
    src, tgt_in, tgt_out = (mx.nd.array(a, dtype="float32") for a in (batch.src, batch.tgt_in, batch.tgt_out))
    src_len, tgt_len = mx.nd.array(batch.src_valid_len), mx.nd.array(batch.tgt_valid_len)

    def step() -> None:
        with autograd.record():
            loss = loss_fn(forward(src, src_len, tgt_in, tgt_len), tgt_out, tgt_len, 0.1)
        loss.backward()
        trainer.step(int(batch.num_tgt_tokens))
        mx.nd.waitall()

    return step


def time_alternating(steps: dict, num_steps: int, warmup: int) -> tuple[dict, dict]:
    """Wall and process-CPU seconds of each timed step per name. The candidates alternate step by step so that
    load from other processes on a shared machine hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(num_steps):
        for name, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return wall, cpu


def gluonnlp_reference(hp, vocab: int, prefix: str = "ref_"):
    """GluonNLP 0.10 NMTModel Transformer with the same sizes, shared and tied embeddings."""
    from gluonnlp.model.transformer import get_transformer_encoder_decoder
    from gluonnlp.model.translation import NMTModel

    if hp.num_enc_layers != hp.num_dec_layers or hp.pre_norm:
        raise ValueError("GluonNLP 0.10 reference needs equal encoder/decoder depth and post-norm")
    encoder, decoder, one_step = get_transformer_encoder_decoder(
        num_layers=hp.num_enc_layers, num_heads=hp.num_heads, units=hp.d_model, hidden_size=hp.d_ff,
        dropout=hp.dropout, max_src_length=512, max_tgt_length=512, prefix=prefix)
    vocab_list = list(range(vocab))  # NMTModel only needs len(vocab)
    model = NMTModel(vocab_list, vocab_list, encoder, decoder, one_step, embed_size=hp.d_model,
                     share_embed=True, tie_weights=True, prefix=f"{prefix}nmt_")
    model.initialize(mx.init.Xavier(magnitude=3))
    model.collect_params().setattr("grad_req", "add")  # as the trainer's models (train_step zeroes after update)
    model.hybridize(static_alloc=True)
    return model, lambda src, sl, tgt, tl: model(src, tgt, sl, tl)[0]


class _Forward:
    """A GluonNLP model seen through our model contract (`model(src, src_len, tgt_in, tgt_len) -> logits`)."""

    def __init__(self, model, forward) -> None:
        self.model, self.forward = model, forward

    def __call__(self, *args):
        return self.forward(*args)

    def collect_params(self):
        return self.model.collect_params()


def add_step_args(parser: argparse.ArgumentParser, steps: int, steps_help: str | None = None) -> None:
    """The model and batch flags every training-step benchmark takes: --preset, --batch-sentences, --seq-len,
    --vocab, --steps (timed) and --warmup (untimed)."""
    parser.add_argument("--preset", default="transformer_base", help="configs/models/<name>.yaml or a path")
    parser.add_argument("--batch-sentences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=25)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--warmup", type=int, default=2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the GluonNLP comparison")
    parser.add_argument("overrides", nargs="*", help="config overrides for our model, e.g. precision.dtype=bf16")
    args = parser.parse_args(argv)

    distributed.init_world()
    cfg = resolve_precision(preset_config(args.preset, tuple(args.overrides)), mx.cpu())
    check_precision(cfg.precision.dtype, False, cfg.precision.loss_scaling)  # as train() does, before any step
    model_cfg = cfg.model
    hp = getattr(model_cfg, model_cfg.arch)
    batch = random_batch(args.batch_sentences, args.seq_len, args.seq_len, args.vocab)
    num_tokens = 2 * args.batch_sentences * args.seq_len
    peak = fc_peak_gflops()
    with_reference = model_cfg.arch == "transformer" and not args.no_reference
    if with_reference:  # GluonNLP's own step is traced (its graph fixed) in fp32, before our model's AMP
        ref_model, ref_forward = gluonnlp_reference(hp, args.vocab)
        reference_step = gluonnlp_step(ref_forward, ref_model.collect_params(), batch, args.vocab)
        reference_step()
    model = build_model_for(cfg, args.vocab, mx.cpu())
    steps = {"ours": trainer_step(cfg, model, batch)}
    if with_reference:
        steps["reference"] = reference_step
        ref_model2, ref_forward2 = gluonnlp_reference(hp, args.vocab, prefix="ref2_")
        steps["reference_model"] = trainer_step(cfg, _Forward(ref_model2, ref_forward2), batch)
    times, cpu_times = time_alternating(steps, args.steps, args.warmup)
    sec, sec_median = min(times["ours"]), statistics.median(times["ours"])
    result = {"preset": args.preset, "arch": model_cfg.arch, "overrides": args.overrides,
              "fused_ops": ops.resolve(cfg.model.fused_ops), "precision": cfg.precision.dtype,
              "onednn_amx": environment.AMX_STATUS,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "allocator": allocator.status(),
              "batch_sentences": args.batch_sentences, "seq_len": args.seq_len, "vocab": args.vocab,
              "tokens_per_step": num_tokens, "fc_peak_gflops": round(peak, 1), "timed_steps": args.steps,
              "sec_per_step_best": round(sec, 4), "sec_per_step_median": round(sec_median, 4),
              "tokens_per_sec": round(num_tokens / sec, 1), "tokens_per_sec_median": round(num_tokens / sec_median, 1),
              "cpu_sec_per_step_best": round(min(cpu_times["ours"]), 4),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    flop_count = transformer_gflop_per_batch if model_cfg.arch == "transformer" else gnmt_gflop_per_batch
    gflop = flop_count(hp, args.batch_sentences, args.seq_len, args.seq_len, args.vocab)
    result.update(gflop_per_step=round(gflop, 1), gflops=round(gflop / sec, 1),
                  fraction_of_peak=round(gflop / sec / peak, 3))
    if with_reference:
        ref_sec, ref_median = min(times["reference"]), statistics.median(times["reference"])
        result.update(reference="gluonnlp-0.10 NMTModel transformer (fp32, its only CPU precision)",
                      ref_sec_per_step_best=round(ref_sec, 4),
                      ref_sec_per_step_median=round(ref_median, 4), ref_tokens_per_sec=round(num_tokens / ref_sec, 1),
                      ref_fraction_of_peak=round(result["gflop_per_step"] / ref_sec / peak, 3),
                      speedup_vs_reference=round(ref_sec / sec, 3),
                      speedup_vs_reference_median=round(ref_median / sec_median, 3),
                      ref_cpu_sec_per_step_best=round(min(cpu_times["reference"]), 4),
                      speedup_vs_reference_cpu=round(min(cpu_times["reference"]) / min(cpu_times["ours"]), 3))
        model_sec = min(times["reference_model"])
        result.update(reference_model="the same GluonNLP model under our step (dist_nmt.step.train_step, "
                                      f"precision {cfg.precision.dtype})",
                      ref_model_sec_per_step_best=round(model_sec, 4),
                      ref_model_tokens_per_sec=round(num_tokens / model_sec, 1),
                      speedup_vs_reference_model=round(model_sec / sec, 3),
                      speedup_vs_reference_model_median=round(statistics.median(times["reference_model"])
                                                              / sec_median, 3))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
