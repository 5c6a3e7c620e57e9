"""Paths and helpers shared by the test tiers: run the real CLI and trainer as subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PYTHON = sys.executable
TINY = "configs/tiny.yaml"
# Short runs: no mid-run validation or test decoding unless a test asks for it.
FAST = ["train.eval_every_updates=1000", "train.save_every_updates=1000", "train.validate_at_end=false", "data.test="]


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repo root with one OpenMP thread; fail the test with its output on error."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(overrides: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m dist_nmt.train --config configs/tiny.yaml <overrides>`."""
    return run_cli([PYTHON, "-m", "dist_nmt.train", "--config", TINY, *overrides], **kwargs)


def metrics(run_dir: Path, kind: str) -> list[dict]:
    """Records of one kind from run_dir/metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


HOROVODRUN = str(ROOT / ".venv" / "bin" / "horovodrun")
LAUNCH = {
    "gloo": [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo"],
    "mpi": [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--mpi",
            "--mpi-args=--allow-run-as-root --oversubscribe"],
}


def hvd_train(launcher: str, overrides: list[str], env: dict | None = None, **kwargs):
    """The tiny config under `horovodrun -np 2` on this host (Gloo or MPI)."""
    return run_cli([*LAUNCH[launcher], PYTHON, "-m", "dist_nmt.train", "--config", TINY, *overrides],
                   env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "120", **(env or {})}, **kwargs)
