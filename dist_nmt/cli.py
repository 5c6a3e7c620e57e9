"""The `dist-nmt` command.

    dist-nmt prepare   --config configs/multi30k.yaml
    dist-nmt train     --config configs/multi30k.yaml train.max_updates=200
    dist-nmt translate --run-dir runs/multi30k --input test.en --output test.de
    dist-nmt evaluate  --hyp test.de --ref ref.de [--tok-ref ref.lc.norm.tok.de --lang de]
    dist-nmt average   --run-dir runs/multi30k --last 5 --output runs/multi30k/averaged.params
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from dist_nmt import allocator, distributed


def _prepare(args: argparse.Namespace) -> int:
    from dist_nmt.config import load_config
    from dist_nmt.data.dataset import prepare

    report = prepare(load_config(args.config, args.overrides).data)
    print(json.dumps(report, indent=1))
    return 0


def _train(args: argparse.Namespace) -> int:
    from dist_nmt.train import main as train_main

    return train_main(["--config", args.config, *args.overrides])


def _load_run(run_dir: Path, params: str | None):
    import mxnet as mx

    from dist_nmt.config import load_config
    from dist_nmt.data import Vocab, vocab_path
    from dist_nmt.models import build_model

    cfg = load_config(run_dir / "config.yaml")
    vocab = Vocab.load(vocab_path(cfg.data.prepared_dir))
    model = build_model(cfg.model.arch, getattr(cfg.model, cfg.model.arch), vocab.size)
    if params is None:
        best = run_dir / "checkpoints" / "best" / "model.params"
        from dist_nmt.checkpoint import Checkpointer

        latest = Checkpointer(run_dir, 1).latest_good()
        params = str(best if best.is_file() else (latest / "model.params" if latest else ""))
    if not params or not Path(params).is_file():
        raise SystemExit(f"error: no checkpoint in {run_dir}/checkpoints; train first or pass --params FILE")
    model.load_parameters(params, ctx=mx.cpu())
    logging.getLogger(__name__).info("loaded %s", params)
    return cfg, vocab, model


def _translate(args: argparse.Namespace) -> int:
    import mxnet as mx

    from dist_nmt.translate import encode_sources, format_nbest, translate_ids

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


def _evaluate(args: argparse.Namespace) -> int:
    from dist_nmt.data.text import read_lines
    from dist_nmt.evaluate import sacre_scores, tokenized_bleu

    hyps = list(read_lines(Path(args.hyp)))
    scores = sacre_scores(hyps, list(read_lines(Path(args.ref))))
    if args.tok_ref:
        scores.update(tokenized_bleu(hyps, list(read_lines(Path(args.tok_ref))), args.lang))
    print(json.dumps(scores, indent=1))
    return 0


def _average(args: argparse.Namespace) -> int:
    from dist_nmt.checkpoint import Checkpointer, average_params, verify

    checkpoints = Checkpointer(args.run_dir, 0).list()
    if args.best:
        scored = [(verify(p).get("progress", {}).get("best_bleu", -1), p) for p in checkpoints]
        chosen = [p for _, p in sorted(scored, key=lambda x: x[0])[-args.best:]]
    else:
        chosen = checkpoints[-args.last:]
    average_params(chosen, args.output)
    print(json.dumps({"averaged": [str(p) for p in chosen], "output": args.output}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per user task."""
    parser = argparse.ArgumentParser(prog="dist-nmt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("prepare", _prepare), ("train", _train)):
        p = sub.add_parser(name, help=f"{name} (see --config)")
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.vocab_size=8000")
        p.set_defaults(fn=fn)
    p = sub.add_parser("translate", help="translate a file or stdin with a trained run")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--params", help="params file (default: best, else newest checkpoint)")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--beam", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--nbest", type=int, default=1)
    p.set_defaults(fn=_translate)
    p = sub.add_parser("evaluate", help="sacreBLEU + chrF (and tokenized lowercase BLEU)")
    p.add_argument("--hyp", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--tok-ref")
    p.add_argument("--lang", default="de")
    p.set_defaults(fn=_evaluate)
    p = sub.add_parser("average", help="average the last-N or best-N checkpoints")
    p.add_argument("--run-dir", required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--last", type=int, default=5)
    group.add_argument("--best", type=int)
    p.add_argument("--output", required=True)
    p.set_defaults(fn=_average)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dist-nmt` console script."""
    args = build_parser().parse_args(argv)
    if argv is None:  # a real command line: re-executes once with tcmalloc preloaded (see dist_nmt.allocator)
        allocator.preload_tcmalloc(["-m", "dist_nmt.cli", *sys.argv[1:]])
    distributed.configure_threads()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dist_nmt.config import ConfigError
    from dist_nmt.data.text import DataError

    try:
        return args.fn(args)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
