"""Real Horovod data parallelism on 2 processes (Gloo and MPI): identical parameters, equivalence with a
single process fed the same global batches, resume across world sizes, and a killed worker never hangs the job."""
import json
import os
import signal
import subprocess
import time

import mxnet as mx
import numpy as np
import pytest

from support import (
    FAST,
    LAUNCH,
    PYTHON,
    ROOT,
    TINY,
    assert_test_decoded_by_chosen_model,
    hvd_train,
    metrics,
    small_test_sets,
    train,
)

# No dropout: a 2-rank step and a 1-process step over the same two shards then compute the same gradients.
DETERMINISTIC = ["model.transformer.dropout=0", "model.transformer.attention_dropout=0", "train.data_shards=2",
                 "train.log_every_updates=1"]


def _load(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def _last_ckpt(run) -> dict[str, np.ndarray]:
    return _load(sorted((run / "checkpoints").glob("ckpt-*"))[-1] / "model.params")


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_two_ranks_identical_and_equal_to_one_process(tmp_path, prepared, launcher):
    two, one, dump = tmp_path / "np2", tmp_path / "np1", tmp_path / "dump"
    common = [prepared, *FAST, *DETERMINISTIC, "train.max_updates=8", "dist.consistency_check_every_updates=4"]
    proc = hvd_train(launcher, [*common, f"train.run_dir={two}"], env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    assert "parameters identical on all 2 ranks" in proc.stdout + proc.stderr
    rank0, rank1 = _load(dump / "rank0.params"), _load(dump / "rank1.params")
    assert rank0.keys() == rank1.keys()
    assert all(np.array_equal(rank0[k], rank1[k]) for k in rank0), "ranks hold different parameters"

    train([*common, f"train.run_dir={one}"])
    np.testing.assert_allclose([r["loss"] for r in metrics(two, "train")],
                               [r["loss"] for r in metrics(one, "train")], rtol=1e-4)
    single = _last_ckpt(one)
    for name, value in rank0.items():
        np.testing.assert_allclose(value, single[name], atol=2e-5, err_msg=name)


def test_resume_np2_equals_uninterrupted_and_resumes_on_np1(tmp_path, prepared):
    common = [prepared, *FAST, *DETERMINISTIC]
    full, split, moved = tmp_path / "full", tmp_path / "split", tmp_path / "moved"
    hvd_train("gloo", [*common, f"train.run_dir={full}", "train.max_updates=8"])
    hvd_train("gloo", [*common, f"train.run_dir={split}", "train.max_updates=4"])
    proc = hvd_train("gloo", [*common, f"train.run_dir={split}", "train.max_updates=8"])
    assert "at update 4" in proc.stdout + proc.stderr
    a, b = _last_ckpt(full), _last_ckpt(split)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)

    hvd_train("gloo", [*common, f"train.run_dir={moved}", "train.max_updates=4"])
    proc = train([*common, f"train.run_dir={moved}", "train.max_updates=8"])  # same data shards, one process
    assert "resumed from" in proc.stderr and "different global batch" not in proc.stderr
    c = _last_ckpt(moved)
    for name in a:
        np.testing.assert_allclose(a[name], c[name], atol=2e-5, err_msg=name)


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the dist_nmt.train workers started (transitively) by the launcher."""
    found = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"dist_nmt.train" in cmd and cmd[0].endswith(b"python") and b"HOROVOD_RANK" in env:
            found[int(env[b"HOROVOD_RANK"])] = pid
    return found


def test_killed_worker_ends_job_within_bound_and_relaunch_resumes(tmp_path, prepared):
    run = tmp_path / "run"
    args = [*LAUNCH["gloo"], PYTHON, "-m", "dist_nmt.train", "--config", TINY, prepared, *FAST,
            f"train.run_dir={run}", "train.max_updates=100000", "train.save_every_updates=5",
            "dist.stall_check_seconds=10", "dist.stall_shutdown_seconds=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not list((run / "checkpoints").glob("ckpt-*")) and time.time() < deadline:
            time.sleep(1)
        assert list((run / "checkpoints").glob("ckpt-*")), "no checkpoint was written"
        pids = _worker_pids(job.pid)
        assert set(pids) == {0, 1}, pids
        killed_at = time.time()
        os.kill(pids[1], signal.SIGKILL)
        job.wait(timeout=90)
        assert job.returncode != 0
        assert time.time() - killed_at < 90
    finally:
        if job.poll() is None:
            job.kill()
    saved = int(sorted((run / "checkpoints").glob("ckpt-*"))[-1].name.split("-")[1])
    proc = hvd_train("gloo", [prepared, *FAST, f"train.run_dir={run}", f"train.max_updates={saved + 6}"])
    assert f"at update {saved}" in proc.stdout + proc.stderr
    assert sorted((run / "checkpoints").glob("ckpt-*"))[-1].name == f"ckpt-{saved + 6:08d}"


def metrics_written(run) -> bool:
    path = run / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0


def test_sigterm_on_launcher_makes_rank0_checkpoint(tmp_path, prepared):
    run = tmp_path / "run"
    args = [*LAUNCH["gloo"], PYTHON, "-m", "dist_nmt.train", "--config", TINY, prepared, *FAST,
            f"train.run_dir={run}", "train.max_updates=100000", "train.log_every_updates=5"]
    job = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not metrics_written(run) and time.time() < deadline:
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert "stopping at update" in output and ": signal" in output
    checkpoints = sorted((run / "checkpoints").glob("ckpt-*"))
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) >= 5


def test_gnmt_two_ranks_hold_identical_parameters(tmp_path, prepared):
    dump = tmp_path / "dump"
    gnmt = ["model.arch=gnmt", "model.gnmt.hidden_size=32", "model.gnmt.embed_size=32",
            "model.gnmt.residual_from_layer=2"]
    proc = hvd_train("gloo", [prepared, *FAST, *gnmt, f"train.run_dir={tmp_path / 'run'}", "train.max_updates=6",
                              "dist.consistency_check_every_updates=3"], env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    assert "update 6: parameters identical on all 2 ranks" in proc.stdout + proc.stderr
    rank0, rank1 = _load(dump / "rank0.params"), _load(dump / "rank1.params")
    assert "training gnmt on 2 process(es)" in proc.stdout + proc.stderr
    assert all(np.array_equal(rank0[k], rank1[k]) for k in rank0)


def test_two_ranks_agree_on_the_final_model_and_decode_every_test_set_with_it(tmp_path, prepared):
    run = tmp_path / "run"
    proc = hvd_train("gloo", [prepared, f"train.run_dir={run}", "train.max_updates=6", "train.save_every_updates=2",
                              "train.eval_every_updates=3", "train.eval_sample_sentences=8", "train.average_last=3",
                              "train.keep_last=5", *small_test_sets(tmp_path)])
    out = proc.stdout + proc.stderr
    scores = json.loads((run / "test_scores.json").read_text())
    assert set(scores["candidates_dev_bleu"]) == {"best", "average-last-3"}
    assert f"TEST test_2017_flickr.en.gz ({scores['model']} model" in out
    assert_test_decoded_by_chosen_model(tmp_path, run, scores["model"])  # rank 1's half decoded with it too
