"""Data loss and dead or frozen ranks: corrupt checkpoints are moved aside and rewritten, `best/` falls back, stale
temp dirs go, and under `horovodrun -np 2` with default settings a killed or frozen rank ends the job in bounded time
with every checkpoint verifying and a relaunch resuming."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_horovod import _worker_pids

from dist_nmt.checkpoint import verify
from support import FAST, LAUNCH, PYTHON, ROOT, TINY, hvd_train, run_cli, train

CLI = [PYTHON, "-m", "dist_nmt.cli"]
FROZEN_BOUND_S = 60  # heartbeat 40 s (the default) + horovodrun teardown of a stopped process (5 s grace, SIGKILL)
KILLED_BOUND_S = 60


def _ckpts(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("ckpt-????????"))


def test_corrupt_checkpoints_are_moved_aside_and_rewritten(tmp_path, prepared):
    run = tmp_path / "run"
    common = [prepared, *FAST, f"train.run_dir={run}", "train.save_every_updates=2", "train.max_updates=4"]
    train(common)
    newest = _ckpts(run)[-1]
    (newest / "model.params").write_bytes((newest / "model.params").read_bytes()[:50])
    proc = train(common)
    assert "moved" in proc.stderr and "at update 2" in proc.stderr
    assert [p.name for p in _ckpts(run)] == ["ckpt-00000002", "ckpt-00000004"]
    for path in _ckpts(run):
        verify(path)
    assert len(list((run / "checkpoints").glob("ckpt-00000004.corrupt-*"))) == 1  # kept, not deleted
    for path in _ckpts(run):
        (path / "MANIFEST.json").unlink()
    proc = train(common)
    assert "NO LOADABLE CHECKPOINT" in proc.stderr and "FROM SCRATCH" in proc.stderr
    assert [p.name for p in _ckpts(run)] == ["ckpt-00000002", "ckpt-00000004"]
    for path in _ckpts(run):
        verify(path)


def test_corrupt_best_falls_back_for_test_and_translate(tmp_path, prepared):
    run = tmp_path / "run"
    common = [prepared, *FAST, f"train.run_dir={run}", "train.eval_every_updates=2", "train.eval_sample_sentences=4",
              "train.save_every_updates=2"]
    train([*common, "train.max_updates=4"])
    best = run / "checkpoints" / "best" / "model.params"
    best.write_bytes(best.read_bytes()[:100])
    (run / "in.en").write_text("A dog runs.\n")
    proc = run_cli([*CLI, "translate", "--run-dir", str(run), "--input", str(run / "in.en")])
    assert proc.stdout.count("\n") == 1 and "best checkpoint is unusable" in proc.stderr
    best = run / "checkpoints" / "best" / "model.params"
    best.write_bytes(best.read_bytes()[:100])
    proc = train([*common, "train.max_updates=6", "data.test=raw/test_2016_flickr"])
    assert "TEST" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((run / "test_scores.json").read_text())["model"] == "best"


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path, prepared):
    run = tmp_path / "run"
    dead = _dead_pid()
    stale = run / "checkpoints" / f".tmp-{dead}-ckpt-00000002"
    stale.mkdir(parents=True)
    (stale / "model.params").write_bytes(b"x")
    train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=2"])
    assert not stale.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_dropout_change_resumes_with_logged_diff(tmp_path, prepared):
    run = tmp_path / "run"
    train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=2"])
    proc = train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=4", "model.transformer.dropout=0.3"])
    assert "model.transformer.dropout changed from 0.1 to 0.3" in proc.stderr and "at update 2" in proc.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _worker_lines_have_no_traceback(out: str) -> bool:
    return not any("Traceback" in line for line in out.splitlines() if line.startswith("["))


def _start(run: Path, prepared: str) -> subprocess.Popen:
    args = [*LAUNCH["gloo"], PYTHON, "-m", "dist_nmt.train", "--config", TINY, prepared, *FAST,
            f"train.run_dir={run}", "train.max_updates=100000", "train.save_every_updates=3"]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run: Path, job: subprocess.Popen) -> dict[int, int]:
    deadline = time.time() + 300
    while not _ckpts(run) and time.time() < deadline and job.poll() is None:
        time.sleep(0.5)
    assert _ckpts(run), "no checkpoint was written"
    pids = _worker_pids(job.pid)
    assert set(pids) == {0, 1}, pids
    return pids


def test_frozen_rank_ends_job_with_one_line(tmp_path, prepared):
    run = tmp_path / "run"
    job = _start(run, prepared)
    pids = {}
    try:
        pids = _wait_for_checkpoint(run, job)
        stopped_at = time.time()
        os.kill(pids[1], signal.SIGSTOP)
        out, _ = job.communicate(timeout=FROZEN_BOUND_S + 30)
        took = time.time() - stopped_at
    finally:
        for pid in pids.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and took < FROZEN_BOUND_S, (job.returncode, took)
    lines = [line for line in out.splitlines() if "no progress for" in line]
    assert len(lines) == 1 and "rank(s) 1 stopped answering" in lines[0] and "ckpt-" in lines[0], out[-3000:]
    assert _worker_lines_have_no_traceback(out), out[-3000:]


def _kill_trial(tmp_path: Path, prepared: str, rng: random.Random) -> float:
    run = tmp_path / f"run{rng.random():.6f}"
    job = _start(run, prepared)
    try:
        pids = _wait_for_checkpoint(run, job)
        time.sleep(rng.uniform(0.0, 6.0))  # random moment: during steps, validation-free saves every 3 updates
        victim = rng.choice([0, 1])
        killed_at = time.time()
        os.kill(pids[victim], signal.SIGKILL)
        job.communicate(timeout=KILLED_BOUND_S + 30)
        took = time.time() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and took < KILLED_BOUND_S, (job.returncode, took)
    time.sleep(1)
    assert not [p for p in pids.values() if _alive(p)], "worker left behind"
    for path in _ckpts(run):
        verify(path)
    saved = int(_ckpts(run)[-1].name.split("-")[1])
    proc = hvd_train("gloo", [prepared, *FAST, f"train.run_dir={run}", f"train.max_updates={saved + 3}"])
    assert f"at update {saved}" in proc.stdout + proc.stderr
    assert _ckpts(run)[-1].name == f"ckpt-{saved + 3:08d}"
    return took


def _campaign(tmp_path, prepared, trials: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    times = [_kill_trial(tmp_path, prepared, rng) for _ in range(trials)]
    times.sort()
    print(json.dumps({"trials": trials, "median_s": round(times[len(times) // 2], 2), "max_s": round(times[-1], 2)}))
    return times


def test_kill_campaign_short(tmp_path, prepared):
    _campaign(tmp_path, prepared, 3, seed=16)


@pytest.mark.slow
def test_kill_campaign_long(tmp_path, prepared):
    _campaign(tmp_path, prepared, 20, seed=1616)
