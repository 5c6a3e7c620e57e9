"""What each `dist-nmt` sub-command does, once the CLI has parsed its arguments and set up the process.

Imports MXNet, so only `dist_nmt.cli.main` imports this module, after `environment.init()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import mxnet as mx

from dist_nmt import distributed
from dist_nmt.checkpoint import Checkpointer, average_params, verify
from dist_nmt.config import Config, load_config
from dist_nmt.data import Vocab, prepare, read_lines, vocab_path
from dist_nmt.environment import StopSignal
from dist_nmt.errors import CheckpointError
from dist_nmt.evaluate import sacre_scores, tokenized_bleu
from dist_nmt.models import build_model
from dist_nmt.train import train
from dist_nmt.translate import encode_sources, format_nbest, translate_ids

log = logging.getLogger(__name__)


def run_prepare(args: argparse.Namespace, _stop: StopSignal) -> int:
    """Learn the BPE vocabulary and encode every split (a no-op when inputs are unchanged)."""
    report = prepare(load_config(args.config, args.overrides).data)
    print(json.dumps(report, indent=1))
    return 0


def run_train(args: argparse.Namespace, stop: StopSignal) -> int:
    """Train (or resume); 0 when finished, 143 when stopped by a signal after checkpointing."""
    summary = train(load_config(args.config, args.overrides), stop)
    distributed.shutdown(barrier=True)
    return 0 if summary["completed"] else 143


def _load_run(run_dir: Path, params: str | None) -> tuple[Config, Vocab, mx.gluon.HybridBlock]:
    cfg = load_config(run_dir / "config.yaml")
    vocab = Vocab.load(vocab_path(cfg.data.prepared_dir))
    model = build_model(cfg.model.arch, getattr(cfg.model, cfg.model.arch), vocab.size)
    if params is None:
        checkpointer = Checkpointer(run_dir, keep_last=1)
        latest = checkpointer.latest_good()
        best = checkpointer.best_params()
        params = str(best or (latest / "model.params" if latest else ""))
    if not params or not Path(params).is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}/checkpoints; train first or pass --params FILE")
    model.load_parameters(params, ctx=mx.cpu())
    log.info("loaded %s", params)
    return cfg, vocab, model


def run_translate(args: argparse.Namespace, _stop: StopSignal) -> int:
    """Translate a file or stdin with a trained run, one output line (or nbest lines) per input line."""
    cfg, vocab, model = _load_run(Path(args.run_dir), args.params)
    d = cfg.decode
    decode = dataclasses.replace(d, beam_size=args.beam or d.beam_size, nbest=args.nbest,
                                 alpha=d.alpha if args.alpha is None else args.alpha)
    src = open(args.input, encoding="utf-8") if args.input else sys.stdin  # noqa: SIM115
    lines = [line.rstrip("\n") for line in src]
    hyps = translate_ids(model, encode_sources(vocab, lines, cfg.data.max_len), decode, mx.cpu())
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    for i, nbest in enumerate(hyps):
        if args.nbest > 1:
            out.writelines(line + "\n" for line in format_nbest(i, nbest, vocab))
        else:
            out.write(vocab.decode(nbest[0][0]) + "\n")
    out.flush()
    return 0


def run_evaluate(args: argparse.Namespace, _stop: StopSignal) -> int:
    """sacreBLEU + chrF of a hypothesis file (and tokenized lowercase BLEU)."""
    hyps = list(read_lines(Path(args.hyp)))
    scores = sacre_scores(hyps, list(read_lines(Path(args.ref))))
    if args.tok_ref:
        scores.update(tokenized_bleu(hyps, list(read_lines(Path(args.tok_ref))), args.lang))
    print(json.dumps(scores, indent=1))
    return 0


def run_average(args: argparse.Namespace, _stop: StopSignal) -> int:
    """Average the parameters of the last-N (or best-N by recorded BLEU) checkpoints into one file."""
    checkpoints = Checkpointer(args.run_dir, 0).list()
    if args.best:
        scored = [(verify(p).get("progress", {}).get("best_bleu", -1), p) for p in checkpoints]
        chosen = [p for _, p in sorted(scored, key=lambda x: x[0])[-args.best:]]
    else:
        chosen = checkpoints[-args.last:]
    average_params(chosen, args.output)
    print(json.dumps({"averaged": [str(p) for p in chosen], "output": args.output}, indent=1))
    return 0


COMMANDS = {"prepare": run_prepare, "train": run_train, "translate": run_translate, "evaluate": run_evaluate,
            "average": run_average}
