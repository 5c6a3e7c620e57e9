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
from dist_nmt.data.identity import IDENTITY_FILE, data_identity, refuse_data_change
from dist_nmt.data.text import check_readable
from dist_nmt.environment import StopSignal
from dist_nmt.errors import CheckpointError, ConfigError, DataError
from dist_nmt.evaluate import sacre_scores, tokenized_bleu
from dist_nmt.models import build_model
from dist_nmt.preflight import check_output_file, check_run_dir
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
    if params is None:
        checkpointer = Checkpointer(run_dir, keep_last=1, is_primary=False)  # read-only: nothing is moved aside
        best = checkpointer.best_params()
        latest = checkpointer.latest_good()
        params = str(best or (latest / "model.params" if latest else ""))
    if not params or not Path(params).is_file():
        raise CheckpointError(f"no loadable checkpoint in {run_dir}/checkpoints; train first or pass --params FILE")
    _check_same_data(Path(params).parent / "state.json", run_dir, cfg)
    model = build_model(cfg.model.arch, getattr(cfg.model, cfg.model.arch), vocab.size)
    try:
        model.load_parameters(params, ctx=mx.cpu())
    except (mx.base.MXNetError, AssertionError, ValueError) as err:
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1:] or ["unreadable"]
        raise CheckpointError(f"{params}: not parameters of this run's {cfg.model.arch} model "
                              f"({reason[0][:200]}); pass the model.params of this run") from None
    log.info("loaded %s", params)
    return cfg, vocab, model


def _check_same_data(state_file: Path, run_dir: Path, cfg: Config) -> None:
    """The vocabulary in data.prepared_dir is the one the model was trained with (refuse otherwise)."""
    recorded = None
    for source in (state_file, run_dir / IDENTITY_FILE):
        try:
            recorded = json.loads(source.read_text()).get("data_identity", None) if source == state_file else \
                json.loads(source.read_text())
        except (OSError, ValueError):
            continue
        if recorded:
            break
    refuse_data_change(recorded, data_identity(cfg.data.prepared_dir), str(run_dir), allow_data_change=True)


def _source_lines(path: str | None) -> list[str]:
    return list(read_lines(path) if path else read_lines(sys.stdin.buffer, "stdin"))


def run_translate(args: argparse.Namespace, _stop: StopSignal) -> int:
    """Translate a file or stdin with a trained run, one output line (or nbest lines) per input line."""
    for option, value in (("--beam", args.beam), ("--nbest", args.nbest)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    if args.alpha is not None and args.alpha < 0:
        raise ConfigError(f"--alpha must be >= 0, got {args.alpha}")
    check_run_dir(args.run_dir, must_exist=True, key="--run-dir")
    if args.params:
        check_readable(args.params, "--params")
    if args.input:
        check_readable(args.input, "--input")
    check_output_file(args.output, "--output")
    lines = _source_lines(args.input)  # all input validated (UTF-8, line numbers) before the model loads
    cfg, vocab, model = _load_run(Path(args.run_dir), args.params)
    d = cfg.decode
    decode = dataclasses.replace(d, beam_size=args.beam or d.beam_size, nbest=args.nbest,
                                 alpha=d.alpha if args.alpha is None else args.alpha)
    if decode.nbest > decode.beam_size:
        raise ConfigError(f"--nbest {decode.nbest} exceeds the beam size {decode.beam_size}; raise --beam")
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
    refs = {"--ref": list(read_lines(Path(args.ref)))}
    if args.tok_ref:
        refs["--tok-ref"] = list(read_lines(Path(args.tok_ref)))
    if not hyps:
        raise DataError(f"--hyp {args.hyp} is empty; nothing to score")
    for option, lines in refs.items():
        if len(lines) != len(hyps):
            raise DataError(f"{option} {getattr(args, option[2:].replace('-', '_'))} has {len(lines)} lines but "
                            f"--hyp {args.hyp} has {len(hyps)}; give the reference of the same sentences")
    scores = sacre_scores(hyps, refs["--ref"])
    if args.tok_ref:
        scores.update(tokenized_bleu(hyps, refs["--tok-ref"], args.lang))
    print(json.dumps(scores, indent=1))
    return 0


def run_average(args: argparse.Namespace, _stop: StopSignal) -> int:
    """Average the parameters of the last-N (or best-N by recorded BLEU) checkpoints into one file."""
    count = args.best or args.last
    if count < 1:
        raise ConfigError(f"{'--best' if args.best is not None else '--last'} must be >= 1, got {count}")
    check_run_dir(args.run_dir, must_exist=True, key="--run-dir")
    check_output_file(args.output, "--output")
    checkpoints = Checkpointer(args.run_dir, 0, is_primary=False).list()
    if not checkpoints:
        raise CheckpointError(f"no checkpoints in {Path(args.run_dir) / 'checkpoints'} to average; train first")
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
