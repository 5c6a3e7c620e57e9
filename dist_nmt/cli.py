"""The `dist-nmt` command.

    dist-nmt prepare   --config configs/multi30k.yaml
    dist-nmt train     --config configs/multi30k.yaml train.max_updates=200
    dist-nmt translate --run-dir runs/multi30k --input test.en --output test.de
    dist-nmt evaluate  --hyp test.de --ref ref.de [--tok-ref ref.lc.norm.tok.de --lang de]
    dist-nmt average   --run-dir runs/multi30k --last 5 --output runs/multi30k/averaged.params
"""
from __future__ import annotations

import argparse
import logging
import sys

from dist_nmt import distributed, environment
from dist_nmt.errors import CheckpointError, ConfigError, DataError, PrecisionError, TrainingError

# The project's error types -> exit code. Each carries a one-line message naming the file, key or rank and the fix;
# any other exception is a bug and keeps its traceback.
EXIT_CODES: dict[type[Exception], int] = {
    ConfigError: 2, DataError: 2, CheckpointError: 1, PrecisionError: 1, TrainingError: 1,
}


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per user task."""
    parser = argparse.ArgumentParser(prog="dist-nmt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "train"):
        p = sub.add_parser(name, help=f"{name} (see --config)")
        p.add_argument("--config", required=True, help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_updates=20")
    p = sub.add_parser("translate", help="translate a file or stdin with a trained run")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--params", help="params file (default: best, else newest checkpoint)")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--beam", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--nbest", type=int, default=1)
    p = sub.add_parser("evaluate", help="sacreBLEU + chrF (and tokenized lowercase BLEU)")
    p.add_argument("--hyp", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--tok-ref")
    p.add_argument("--lang", default="de")
    p = sub.add_parser("average", help="average the last-N or best-N checkpoints")
    p.add_argument("--run-dir", required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--last", type=int, default=5)
    group.add_argument("--best", type=int)
    p.add_argument("--output", required=True)
    return parser


def main(argv: list[str] | None = None, reexec_argv: list[str] | None = None) -> int:
    """Entry point of `dist-nmt` (and, through `dist_nmt.train`, of `python -m dist_nmt.train`).

    The process environment comes first (tcmalloc re-exec for a real command line, OpenMP threads, signal
    handlers), before anything imports MXNet.
    """
    if argv is None:
        argv, reexec_argv = sys.argv[1:], ["-m", "dist_nmt.cli", *sys.argv[1:]]
    args = build_parser().parse_args(argv)
    stop = environment.init(reexec_argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from dist_nmt.commands import COMMANDS  # imports MXNet: only after environment.init()

        return COMMANDS[args.command](args, stop)
    except tuple(EXIT_CODES) as err:
        logging.getLogger("dist_nmt").error("%s", err)
        distributed.shutdown()
        return next(code for kind, code in EXIT_CODES.items() if isinstance(err, kind))
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a bug or a system fault, keep the traceback
            raise
        logging.getLogger("dist_nmt").error("%s: %s; check that path (exists, permissions, free space)",
                                            err.filename, err.strerror or err)
        distributed.shutdown()
        return 1


if __name__ == "__main__":
    sys.exit(main())
