"""Paths and helpers shared by the test tiers: run the real CLI and trainer as subprocesses."""
import gzip
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


def head_gz(src, dst, num_lines: int):
    """The first `num_lines` lines of a gzip file, into a temporary file (a small, fast test set)."""
    with gzip.open(src, "rt", encoding="utf-8") as fin, gzip.open(dst, "wt", encoding="utf-8") as fout:
        fout.writelines(line for _, line in zip(range(num_lines), fin, strict=False))


def small_test_sets(tmp_path) -> list[str]:
    """Overrides naming 40-line copies of test2016 (data.test) and test2017 (data.extra_tests) with tok refs."""
    raw, tok = SHARED_DATA / "multi30k" / "raw", SHARED_DATA / "multi30k" / "tok"
    for name in ("test_2016_flickr", "test_2017_flickr"):
        for lang in ("en", "de"):
            head_gz(raw / f"{name}.{lang}.gz", tmp_path / f"{name}.{lang}.gz", 40)
        head_gz(tok / f"{name}.lc.norm.tok.de.gz", tmp_path / f"{name}.tok.de.gz", 40)
    return [f"data.test={tmp_path / 'test_2016_flickr'}",
            f"data.test_tok_ref={tmp_path / 'test_2016_flickr.tok.de.gz'}",
            f"data.extra_tests=[{tmp_path / 'test_2017_flickr'}]",
            f"data.extra_test_tok_refs=[{tmp_path / 'test_2017_flickr.tok.de.gz'}]"]


def assert_test_decoded_by_chosen_model(tmp_path, run, model: str) -> None:
    """The test2017 hypotheses are what `dist-nmt translate` gives with the chosen model's parameter file."""
    params = run / "checkpoints" / ("best/model.params" if model == "best" else "average.params")
    with gzip.open(tmp_path / "test_2017_flickr.en.gz", "rt", encoding="utf-8") as f:
        (tmp_path / "src.en").write_text(f.read(), encoding="utf-8")
    run_cli([PYTHON, "-m", "dist_nmt.cli", "translate", "--run-dir", str(run), "--params", str(params),
             "--input", str(tmp_path / "src.en"), "--output", str(tmp_path / "out.de")])
    assert (tmp_path / "out.de").read_text() == (run / "test.test_2017_flickr.hyp.de").read_text()
