"""Beam-search speed of dist_nmt.decode against GluonNLP 0.10's BeamSearchSampler driving the same model step.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_decode.py --preset transformer_multi30k --beam 4
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_decode.py --checkpoint runs/multi30k/model.params

Random source sentences (Multi30k-like lengths) are translated in batches with both searches; both call the
model's `decode_step`, so the difference is the search itself (bookkeeping, state reordering, stopping). With
random weights (no --checkpoint) the model almost never emits EOS, so every hypothesis runs to its length cap:
a worst case for both. Wall and process CPU seconds are both reported: on a shared machine the CPU time is the
steadier measure (run with OMP_NUM_THREADS=1 there, since spinning OpenMP threads inflate it). The outputs are
compared where the two algorithms coincide (beam 1, alpha 0, one length cap for the batch). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the trainer's process set-up (tcmalloc, threads) before MXNet is imported
    from dist_nmt import environment

    environment.init([__file__, *sys.argv[1:]])

import mxnet as mx
import numpy as np

from dist_nmt import allocator
from dist_nmt.config import load_for_one_step
from dist_nmt.data import BOS_ID as BOS
from dist_nmt.data import EOS_ID as EOS
from dist_nmt.decode import translate_batch
from dist_nmt.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def random_sources(num: int, vocab: int, min_len: int, max_len: int, seed: int):
    """Token-id lists with lengths uniform in [min_len, max_len]."""
    rng = np.random.RandomState(seed)
    return [rng.randint(4, vocab, size=rng.randint(min_len, max_len + 1)).tolist() for _ in range(num)]


def pad_batch(sentences: list[list[int]]):
    """(B, S) float ids padded with 0, and valid lengths (B,)."""
    width = max(len(s) for s in sentences)
    src = np.zeros((len(sentences), width), dtype=np.float32)
    for i, s in enumerate(sentences):
        src[i, :len(s)] = s
    return mx.nd.array(src), mx.nd.array([len(s) for s in sentences])


def gluonnlp_search(model, src, src_len, beam: int, alpha: float, max_length: int) -> list[list[int]]:
    """GluonNLP 0.10 BeamSearchSampler over model.decode_step; best hypothesis per sentence (no BOS/EOS)."""
    from gluonnlp.model import BeamSearchSampler, BeamSearchScorer

    sampler = BeamSearchSampler(beam_size=beam, decoder=lambda tok, st: model.decode_step(tok, st)[:2],
                                eos_id=EOS, scorer=BeamSearchScorer(alpha=alpha, K=5), max_length=max_length)
    states = model.init_decode_states(model.encode(src, src_len))
    samples, _, lengths = sampler(mx.nd.full((src.shape[0],), BOS), states)
    samples, lengths = samples.asnumpy().astype(int), lengths.asnumpy().astype(int)
    return [_strip(samples[b, 0, :lengths[b, 0]].tolist()) for b in range(samples.shape[0])]


def _strip(tokens: list[int]) -> list[int]:
    tokens = tokens[1:]  # BOS
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def run_ours(model, batches, args) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, process CPU seconds, best hypothesis per sentence)."""
    start, cpu_start, outputs = time.perf_counter(), time.process_time(), []
    for src, src_len in batches:
        hyps = translate_batch(model, src, src_len, args.beam, args.alpha, args.beta, args.max_len_a, args.max_len_b)
        outputs += [h[0][0] for h in hyps]
    return time.perf_counter() - start, time.process_time() - cpu_start, outputs


def run_reference(model, batches, args) -> tuple[float, float, list[list[int]]]:
    start, cpu_start, outputs = time.perf_counter(), time.process_time(), []
    for src, src_len in batches:
        max_length = int(np.floor(args.max_len_a * src_len.asnumpy().max() + args.max_len_b))
        outputs += gluonnlp_search(model, src, src_len, args.beam, args.alpha, max_length)
    return time.perf_counter() - start, time.process_time() - cpu_start, outputs


def agreement_where_algorithms_coincide(model, batches, max_len: int) -> float:
    """Fraction of sentences where beam 1 / alpha 0 / uniform cap gives identical tokens in both searches."""
    same = total = 0
    for src, src_len in batches:
        ours = translate_batch(model, src, src_len, 1, 0.0, 0.0, 0.0, max_len)
        ref = gluonnlp_search(model, src, src_len, 1, 0.0, max_len)
        same += sum(o[0][0] == r for o, r in zip(ours, ref, strict=True))
        total += len(ref)
    return same / total


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="transformer_multi30k", help="configs/models/<name>.yaml or a path")
    p.add_argument("--checkpoint", default=None, help="parameters file (model.save_parameters); random if absent")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch-sentences", type=int, default=64)
    p.add_argument("--src-len-min", type=int, default=6)
    p.add_argument("--src-len-max", type=int, default=24)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--no-hybridize", action="store_true")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print (to stderr) the N functions with the most cumulative time in our search")
    return p.parse_args(argv)


def profile_ours(model, batches, args) -> None:
    """cProfile one more pass of our search; the top `args.profile` functions by cumulative time to stderr."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run_ours, model, batches, args)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(args.profile)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    path = Path(args.preset) if Path(args.preset).suffix else ROOT / "configs" / "models" / f"{args.preset}.yaml"
    model_cfg = load_for_one_step(path).model
    mx.random.seed(args.seed)
    model = build_model(model_cfg.arch, getattr(model_cfg, model_cfg.arch), args.vocab)
    if args.checkpoint:
        model.load_parameters(args.checkpoint)
    else:
        model.initialize(mx.init.Xavier(magnitude=3))
    if not args.no_hybridize:
        model.hybridize(static_alloc=True)
    sources = random_sources(args.sentences, args.vocab, args.src_len_min, args.src_len_max, args.seed)
    batches = [pad_batch(sources[i:i + args.batch_sentences]) for i in range(0, len(sources), args.batch_sentences)]
    run_ours(model, batches[:1], args)  # warm-up: graph building, oneDNN primitives
    sec, cpu_sec, ours = run_ours(model, batches, args)
    result = {"preset": args.preset, "checkpoint": args.checkpoint,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "allocator": allocator.status(),
              "sentences": args.sentences,
              "batch_sentences": args.batch_sentences, "beam": args.beam,
              "alpha": args.alpha, "beta": args.beta, "hybridized": not args.no_hybridize,
              "mean_output_tokens": round(float(np.mean([len(o) for o in ours])), 2),
              "sec": round(sec, 3), "cpu_sec": round(cpu_sec, 3), "sentences_per_sec": round(args.sentences / sec, 1)}
    if args.profile:
        profile_ours(model, batches, args)
    if not args.no_reference:
        run_reference(model, batches[:1], args)
        ref_sec, ref_cpu_sec, ref = run_reference(model, batches, args)
        identical = float(np.mean([o == r for o, r in zip(ours, ref, strict=True)]))
        result.update(reference="gluonnlp-0.10 BeamSearchSampler (same decode_step)", ref_sec=round(ref_sec, 3),
                      ref_cpu_sec=round(ref_cpu_sec, 3), speedup_vs_reference_cpu=round(ref_cpu_sec / cpu_sec, 3),
                      ref_sentences_per_sec=round(args.sentences / ref_sec, 1),
                      speedup_vs_reference=round(ref_sec / sec, 3),
                      top1_identical_fraction=round(identical, 3),
                      identical_fraction_beam1_alpha0=agreement_where_algorithms_coincide(model, batches[:2], 20))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
