"""Run one short training per override set and print one JSON line per run (dev BLEU at equal wall time).

    python scripts/sweep.py scripts/sweeps/gnmt_screen.yaml --output runs/sweep-gnmt/results.jsonl

The sweep file names the base config, the budget of every run (`minutes:` of wall time, or `updates:` when the
changes leave the cost of an update alone, so the comparison does not depend on how busy the machine is), overrides
common to every run, and the runs:

    config: configs/multi30k_gnmt.yaml
    minutes: 30
    common: [train.eval_every_updates=100]
    runs:
      - {name: baseline, overrides: []}
      - {name: decoder-init, overrides: [model.gnmt.decoder_init=encoder]}

Each run is `python -m dist_nmt.train --config CONFIG *common *overrides train.max_time_minutes=M (or
train.max_updates=N) train.run_dir=RUN_ROOT/NAME` (RUN_ROOT defaults to runs/sweep-<sweep file stem>). Runs go one
after another, or `--parallel K` at a time with run i pinned to its own cores (os.sched_setaffinity, OMP_NUM_THREADS
= cores per run), which on a 2-core machine screens twice as many settings per hour at one thread each. Its line
holds the dev curve (update, minutes, BLEU, perplexity) from RUN_DIR/metrics.jsonl, the number of updates, the mean
training tokens/s, the peak RSS (largest over ranks), the final and best dev BLEU, test BLEU when the run decoded
the test set, and the exit code.
Runs whose result line already exists in the output file are skipped, so an interrupted sweep resumes;
`--only a,b` runs just the named runs (e.g. the top few again, or a subset when time is short).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

log = logging.getLogger("sweep")


def summarize(run_dir: Path) -> dict:
    """Curve and totals of one finished run from run_dir/metrics.jsonl (empty values when it wrote nothing)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    test = [r for r in records if r["kind"] == "test"]
    curve = [[r["update"], round(r["time"] / 60, 2), r["bleu"], r.get("ppl")] for r in valid]
    return {"dev_bleu_curve": curve,
            "updates": max((r["update"] for r in records), default=0),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in train) / len(train), 1) if train else None,
            "peak_rss_gb": max((r["peak_rss_gb"] for r in train if "peak_rss_gb" in r), default=None),
            "final_dev_bleu": curve[-1][2] if curve else None,
            "best_dev_bleu": max((c[2] for c in curve), default=None),
            "test_bleu": test[-1].get("bleu") if test else None,
            "test_tok_bleu": test[-1].get("tok_bleu") if test else None}


def command(config: str, overrides: list[str], budget: dict, run_dir: Path) -> list[str]:
    """The training command of one run (budget and run directory last, so they win)."""
    limit = f"train.max_updates={budget['updates']}" if "updates" in budget else \
        f"train.max_time_minutes={budget['minutes']}"
    return [sys.executable, "-m", "dist_nmt.train", "--config", config, *overrides, limit, f"train.run_dir={run_dir}"]


def load_sweep(path: Path) -> dict:
    """Read and check the sweep file; errors name the missing key."""
    sweep = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key in ("config", "runs"):
        if key not in sweep:
            raise SystemExit(f"{path}: missing '{key}' (see scripts/sweep.py's docstring for the format)")
    if ("minutes" in sweep) == ("updates" in sweep):
        raise SystemExit(f"{path}: give exactly one budget, 'minutes' or 'updates'")
    names = [run["name"] for run in sweep["runs"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: run names must be unique, got {names}")
    return sweep


def select_runs(runs: list[dict], done: set[str], only: str | None, path: Path) -> list[dict]:
    """The runs still to do, in file order: not in `done`, and named in `only` (comma-separated) when given."""
    todo = [run for run in runs if run["name"] not in done]
    if not only:
        return todo
    wanted = set(only.split(","))
    unknown = wanted - {run["name"] for run in runs}
    if unknown:
        raise SystemExit(f"--only: no run named {', '.join(sorted(unknown))} in {path}; its runs are: "
                         f"{', '.join(run['name'] for run in runs)}")
    return [run for run in todo if run["name"] in wanted]


def pinned(slot: int, cores_per_run: int) -> tuple[dict, object]:
    """Environment and pre-exec hook that give parallel slot `slot` its own cores and that many OpenMP threads."""
    cores = sorted(os.sched_getaffinity(0))[slot * cores_per_run:(slot + 1) * cores_per_run]
    env = {**os.environ, "OMP_NUM_THREADS": str(cores_per_run)}
    return env, lambda: os.sched_setaffinity(0, cores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="YAML or JSON sweep file")
    parser.add_argument("--output", type=Path, help="JSON-lines results (default RUN_ROOT/results.jsonl)")
    parser.add_argument("--run-root", type=Path, help="parent of the run directories")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each pinned to its own cores")
    parser.add_argument("--only", help="comma-separated run names: run just these (in the sweep file's order)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sweep = load_sweep(args.sweep)
    cores_per_run = len(os.sched_getaffinity(0)) // args.parallel
    if cores_per_run < 1:
        raise SystemExit(f"--parallel {args.parallel}: only {len(os.sched_getaffinity(0))} cores to pin runs to")
    budget = {key: sweep[key] for key in ("minutes", "updates") if key in sweep}
    root = args.run_root or Path("runs") / f"sweep-{args.sweep.stem}"
    output = args.output or root / "results.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["name"] for line in output.read_text().splitlines() if line.strip()} \
        if output.is_file() else set()
    todo = select_runs(sweep["runs"], done, args.only, args.sweep)
    for name in sorted(done):
        log.info("skipping %s: already in %s", name, output)
    for first in range(0, len(todo), args.parallel):
        running = []
        for slot, run in enumerate(todo[first:first + args.parallel]):
            overrides = list(sweep.get("common", [])) + list(run.get("overrides", []))
            cmd = command(sweep["config"], overrides, budget, root / run["name"])
            log.info("run %s: %s", run["name"], " ".join(cmd))
            env, preexec = pinned(slot, cores_per_run) if args.parallel > 1 else (None, None)
            running.append((run, overrides, subprocess.Popen(cmd, env=env, preexec_fn=preexec)))
        for run, overrides, process in running:
            result = {"name": run["name"], "overrides": overrides, **budget, "parallel": args.parallel,
                      "exit_code": process.wait(), **summarize(root / run["name"])}
            with output.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
