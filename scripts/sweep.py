"""Run one short training per override set and print one JSON line per run (dev BLEU at equal wall time).

    python scripts/sweep.py scripts/sweeps/gnmt_screen.yaml --output runs/sweep-gnmt/results.jsonl

The sweep file names the base config, the minutes per run, overrides common to every run, and the runs:

    config: configs/multi30k_gnmt.yaml
    minutes: 30
    common: [train.eval_every_updates=100]
    runs:
      - {name: baseline, overrides: []}
      - {name: decoder-init, overrides: [model.gnmt.decoder_init=encoder]}

Each run is `python -m dist_nmt.train --config CONFIG *common *overrides train.max_time_minutes=M
train.run_dir=RUN_ROOT/NAME` (RUN_ROOT defaults to runs/sweep-<sweep file stem>), one after another. Its line holds
the dev BLEU curve (update, minutes, BLEU) from RUN_DIR/metrics.jsonl, the number of updates, the mean training
tokens/s, the final and best dev BLEU, test BLEU when the run decoded the test set, and the exit code.
Runs whose result line already exists in the output file are skipped, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
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
    curve = [[r["update"], round(r["time"] / 60, 2), r["bleu"]] for r in valid]
    return {"dev_bleu_curve": curve,
            "updates": max((r["update"] for r in records), default=0),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in train) / len(train), 1) if train else None,
            "final_dev_bleu": curve[-1][2] if curve else None,
            "best_dev_bleu": max((c[2] for c in curve), default=None),
            "test_bleu": test[-1].get("bleu") if test else None,
            "test_tok_bleu": test[-1].get("tok_bleu") if test else None}


def command(config: str, overrides: list[str], minutes: float, run_dir: Path) -> list[str]:
    """The training command of one run (time budget and run directory last, so they win)."""
    return [sys.executable, "-m", "dist_nmt.train", "--config", config, *overrides,
            f"train.max_time_minutes={minutes}", f"train.run_dir={run_dir}"]


def load_sweep(path: Path) -> dict:
    """Read and check the sweep file; errors name the missing key."""
    sweep = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key in ("config", "minutes", "runs"):
        if key not in sweep:
            raise SystemExit(f"{path}: missing '{key}' (see scripts/sweep.py's docstring for the format)")
    names = [run["name"] for run in sweep["runs"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: run names must be unique, got {names}")
    return sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="YAML or JSON sweep file")
    parser.add_argument("--output", type=Path, help="JSON-lines results (default RUN_ROOT/results.jsonl)")
    parser.add_argument("--run-root", type=Path, help="parent of the run directories")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sweep = load_sweep(args.sweep)
    root = args.run_root or Path("runs") / f"sweep-{args.sweep.stem}"
    output = args.output or root / "results.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["name"] for line in output.read_text().splitlines() if line.strip()} \
        if output.is_file() else set()
    for run in sweep["runs"]:
        if run["name"] in done:
            log.info("skipping %s: already in %s", run["name"], output)
            continue
        overrides = list(sweep.get("common", [])) + list(run.get("overrides", []))
        cmd = command(sweep["config"], overrides, sweep["minutes"], root / run["name"])
        log.info("run %s: %s", run["name"], " ".join(cmd))
        code = subprocess.call(cmd)
        result = {"name": run["name"], "overrides": overrides, "minutes": sweep["minutes"], "exit_code": code,
                  **summarize(root / run["name"])}
        with output.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
