"""Render a run's loss and BLEU curves to PNG from its metrics.jsonl.

    python scripts/plot_run.py runs/multi30k            # writes runs/multi30k/curves.png
    python scripts/plot_run.py runs/a runs/b --output compare.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run_dir: Path) -> list[dict]:
    """All records of run_dir/metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot(run_dirs: list[Path], output: Path) -> None:
    """Train/dev loss and dev BLEU against updates, one line per run."""
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        records = load(run_dir)
        train = [r for r in records if r["kind"] == "train"]
        valid = [r for r in records if r["kind"] == "valid"]
        ax_loss.plot([r["update"] for r in train], [r["loss"] for r in train], label=f"{run_dir.name} train")
        ax_loss.plot([r["update"] for r in valid], [r["loss"] for r in valid], "o-", label=f"{run_dir.name} dev")
        ax_bleu.plot([r["update"] for r in valid], [r["bleu"] for r in valid], "o-", label=run_dir.name)
    ax_loss.set(xlabel="update", ylabel="label-smoothed loss per token", title="loss")
    ax_bleu.set(xlabel="update", ylabel="sacreBLEU (dev sample)", title="dev BLEU")
    for ax in (ax_loss, ax_bleu):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or args.run_dirs[0] / "curves.png"
    plot(args.run_dirs, output)
    print(json.dumps({"output": str(output)}))


if __name__ == "__main__":
    main()
