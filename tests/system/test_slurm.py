"""cluster/slurm/train.sbatch on a real (local, one-node) Slurm: a 2-task Horovod run of the tiny config trains to
the end, and a preempted job, requeued, resumes from its checkpoint instead of starting over.

    sudo .venv/bin/python -m pytest -q -m slurm tests/system/test_slurm.py      # about 4 minutes on 2 cores

The module fixture installs Debian's slurm-wlm + munge if needed and starts munged/slurmctld/slurmd through
cluster/slurm/setup_local_slurm.sh, and stops them afterwards (unless a local Slurm from that script was already
running). Skipped when not root, when the packages cannot be installed, or when this host has a Slurm
configuration the script did not write.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT

pytestmark = pytest.mark.slurm

SETUP = ROOT / "cluster" / "slurm" / "setup_local_slurm.sh"
SBATCH = ROOT / "cluster" / "slurm" / "train.sbatch"
TINY = "configs/tiny.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
RESUMED = re.compile(r"resumed from (\S+) at update (\d+)")
# Small run on 2 cores: one OpenMP thread per task, frequent logs, no mid-run validation.
SHORT = ["train.log_every_updates=1", "train.eval_every_updates=1000"]


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm; torn down afterwards if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs slurm-wlm/munge, writes /etc/slurm and starts daemons")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    already_up = subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0 \
        if shutil.which("scontrol") else False
    up = subprocess.run(["bash", str(SETUP), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode == 3:
        pytest.skip(f"cannot install or start Slurm here: {up.stderr.strip()[-600:]}")
    if up.returncode != 0 and "not written by this script" in up.stderr:
        pytest.skip(f"this host has its own Slurm configuration: {up.stderr.strip()[-300:]}")
    assert up.returncode == 0, f"setup_local_slurm.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not already_up:
        down = subprocess.run(["bash", str(SETUP), "down"], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """The tiny config's data, encoded once into a temporary directory."""
    out = tmp_path_factory.mktemp("slurm-data") / "multi30k-1k"
    subprocess.run([sys.executable, "-m", "dist_nmt.cli", "prepare", "--config", TINY, f"data.prepared_dir={out}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return f"data.prepared_dir={out}"


def submit(run_dir: Path, overrides: list[str], name: str) -> tuple[int, Path]:
    """sbatch the template with 2 tasks x 1 CPU on the tiny config; returns (job id, Slurm output file)."""
    out = run_dir.parent / f"{name}.out"
    # A stray OMP_NUM_THREADS in the submitting shell must not win over --cpus-per-task.
    env = {**os.environ, "OMP_NUM_THREADS": "7", "CONFIG": TINY, "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
           "DIST_NMT_DIR": str(ROOT)}
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={out}", "--nodes=1", "--ntasks-per-node=2",
           "--cpus-per-task=1", "--time=15", str(SBATCH), *overrides]
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(job.stdout.strip().split(";")[0]), out


def job_info(job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for(predicate, timeout: float, what: str, job_id: int, out: Path, run_dir: Path):
    """Poll until predicate() is truthy; on timeout cancel the job and fail with its logs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)], capture_output=True)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; job {job_info(job_id)}\n{logs(out, run_dir)}")


def wait_done(job_id: int, out: Path, run_dir: Path, timeout: float = 240) -> dict[str, str]:
    return wait_for(lambda: (info := job_info(job_id)).get("JobState") in TERMINAL and info, timeout,
                    "the job to finish", job_id, out, run_dir)


def logs(out: Path, run_dir: Path) -> str:
    text = ""
    for path in (out, run_dir / "train.log"):
        text += f"--- {path}\n{path.read_text()[-5000:] if path.exists() else '(missing)'}\n"
    return text


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (MANIFEST.json is written last)."""
    return sorted(p.parent for p in (run_dir / "checkpoints").glob("ckpt-*/MANIFEST.json"))


def test_two_task_job_trains_to_completion(slurm, prepared, tmp_path) -> None:
    run_dir = tmp_path / "run"
    job_id, out = submit(run_dir, [prepared, *SHORT, "train.max_updates=30", "train.save_every_updates=15"],
                         "nmt-complete")
    info = wait_done(job_id, out, run_dir)
    context = f"job {info}\n{logs(out, run_dir)}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context
    slurm_out, train_log = out.read_text(), (run_dir / "train.log").read_text()
    assert "2 tasks, 1 CPUs and OMP_NUM_THREADS=1 per task" in slurm_out, context
    assert "training step exited with 0" in slurm_out, context  # srun exits 0 only when both tasks did
    assert "on 2 process(es)" in train_log, context
    assert re.search(r"TEST .*sacreBLEU \d+\.\d+", train_log), context
    assert [p.name for p in checkpoints(run_dir)][-1] == "ckpt-00000030", context
    assert "resumed from" not in train_log, context


def test_requeued_job_resumes_from_its_checkpoint(slurm, prepared, tmp_path) -> None:
    """`scontrol requeue` (what preemption in REQUEUE mode does): SIGTERM to every task, the job goes back to the
    queue under the same id, and the second run continues from the checkpoint instead of update 0."""
    run_dir = tmp_path / "run"
    job_id, out = submit(run_dir, [prepared, *SHORT, "train.max_updates=60", "train.save_every_updates=5"],
                         "nmt-requeue")
    wait_for(lambda: checkpoints(run_dir), 180, "the first checkpoint", job_id, out, run_dir)
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True)
    info = wait_done(job_id, out, run_dir)
    context = f"job {info}\n{logs(out, run_dir)}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context
    assert info["Restarts"] == "1", context
    train_log = (run_dir / "train.log").read_text()
    resumed = RESUMED.findall(train_log)
    assert len(resumed) == 1 and int(resumed[0][1]) > 0, context
    # The SIGTERM checkpoint, not just the last periodic one: nothing after the requeue is lost.
    stopped = re.search(r"stopping at update (\d+): signal", train_log)
    assert stopped and int(resumed[0][1]) == int(stopped.group(1)), context
    assert re.search(r"TEST .*sacreBLEU", train_log), context
    assert checkpoints(run_dir)[-1].name == "ckpt-00000060", context


def test_time_limit_signal_checkpoints_and_requeues(slurm, prepared, tmp_path) -> None:
    """What `--signal=B:USR1@N` does near the time limit, sent by hand so the test does not wait for it: the batch
    script forwards USR1 to the training step, rank 0 checkpoints, the trainer exits 143, the script requeues the
    job and the next run resumes exactly where the signal stopped it (no periodic checkpoint in between)."""
    run_dir = tmp_path / "run"
    job_id, out = submit(run_dir, [prepared, *SHORT, "train.max_updates=40", "train.save_every_updates=1000"],
                         "nmt-usr1")
    log = run_dir / "train.log"
    wait_for(lambda: log.exists() and re.search(r"update [3-9]\d* \|", log.read_text()), 180, "a few updates",
             job_id, out, run_dir)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job_id)], check=True, capture_output=True)
    info = wait_done(job_id, out, run_dir)
    context = f"job {info}\n{logs(out, run_dir)}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context
    assert info["Restarts"] == "1", context
    slurm_out, train_log = out.read_text(), log.read_text()
    assert "USR1: time limit near" in slurm_out and "training step exited with 143" in slurm_out, context
    assert "requeueing job" in slurm_out, context
    stopped = re.search(r"stopping at update (\d+): signal", train_log)
    resumed = RESUMED.findall(train_log)
    assert stopped and len(resumed) == 1, context
    assert int(resumed[0][1]) == int(stopped.group(1)) > 0, context
    assert checkpoints(run_dir)[-1].name == "ckpt-00000040", context
