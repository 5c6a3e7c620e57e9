"""Four ranks on a simulated cluster (tests/integration/cluster.py): four hosts x one slot and two hosts x two
slots behind one switch, launched by `horovodrun --gloo` and by Open MPI's `mpirun`; gradient compression; a host
whose cable is pulled mid-run; a lossy link.

Every multi-rank run here is compared with one process fed the same global batches (`train.data_shards=4`, no
dropout), so "trains correctly" means: the same loss curve and the same parameters within float tolerance.
`-m cluster_slow` adds the longer variants (make test-cluster-slow).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from integration import cluster as sim
from support import FAST, PYTHON, ROOT, TINY, metrics, run_cli, train

UPDATES = 6
# No dropout and the same 4 shards per update on any world size. Adam's epsilon is raised from 1e-9 because some
# gradients are zero or nearly so (attention key biases: softmax ignores a per-query constant; dead ReLU units;
# output rows of unseen tokens) and their float rounding noise depends on the summation order; with epsilon 1e-9
# Adam turns that noise into full +-lr steps (3.2e-5 apart after 6 updates at 4 shards; 1.6e-5 with 1e-6).
DETERMINISTIC = ["model.transformer.dropout=0", "model.transformer.attention_dropout=0", "train.data_shards=4",
                 "train.log_every_updates=1", "optim.epsilon=1e-5"]
# Four MXNet processes starting on two busy cores reach hvd.init() up to a minute apart; Gloo's rendezvous waits.
GLOO_TIMEOUT = "180"
# fp16 gradients round each reduced gradient to 11 significant bits; Adam's update is scale-free, so the curve barely
# moves: over 6 tiny updates the logged losses matched the fp32 ones to every printed digit (parameters within 8e-7).
FP16_LOSS_RTOL = 1e-3
PARAM_ATOL = 2e-5  # 4 shards summed in another order than one process sums them


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = sim.available()
    if reason:
        pytest.skip(f"simulated cluster: {reason}")
    hosts = sim.SimCluster.create(4, tmp_path_factory.mktemp("cluster"))
    yield hosts
    hosts.destroy()  # also when a test failed or timed out: kills what is left, removes namespaces and files


@pytest.fixture
def net(cluster):
    """The cluster, with every link plugged in and unshaped again after the test."""
    yield cluster
    for host in cluster.hosts:
        cluster.set_link(host, up=True)
        cluster.shape(host)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared) -> Path:
    """One process over the same 4 shards per update: checkpoints every 2 updates, validation at the end."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train([prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}", f"train.max_updates={UPDATES}",
           "train.save_every_updates=2", "train.validate_at_end=true"])
    return run


def _load(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def _ckpt(run: Path, update: int) -> dict[str, np.ndarray]:
    return _load(run / "checkpoints" / f"ckpt-{update:08d}" / "model.params")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run, "train")]


def _launch(net: sim.SimCluster, launcher: list[str], overrides: list[str], env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    """Run the tiny trainer under `launcher` from inside the first host's namespace."""
    full_env = net.env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": GLOO_TIMEOUT,
                        **(env or {})})
    return run_cli([*net.exec_in(net.hosts[0]), *launcher, PYTHON, "-m", "dist_nmt.train", "--config", TINY,
                    *overrides], env=full_env, timeout=kwargs.pop("timeout", 600), **kwargs)


def _assert_ranks_identical(dump: Path, size: int = 4) -> dict[str, np.ndarray]:
    ranks = [_load(dump / f"rank{r}.params") for r in range(size)]
    for r, params in enumerate(ranks[1:], 1):
        assert params.keys() == ranks[0].keys()
        differ = [k for k in params if not np.array_equal(params[k], ranks[0][k])]
        assert not differ, f"rank {r} holds different parameters than rank 0: {differ[:5]}"
    return ranks[0]


def _assert_matches_reference(params: dict[str, np.ndarray], run: Path, reference: Path) -> None:
    np.testing.assert_allclose(_losses(run), _losses(reference)[:len(_losses(run))], rtol=1e-4)
    single = _ckpt(reference, UPDATES)
    for name, value in params.items():
        np.testing.assert_allclose(value, single[name], atol=PARAM_ATOL, err_msg=name)


def _assert_nothing_left(net: sim.SimCluster, seconds: float = 15) -> None:
    deadline = time.time() + seconds
    while any(net.pids().values()) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(net.pids().values()), f"processes left on the hosts after the job ended: {net.pids()}"


def test_four_hosts_one_slot_each_equal_one_process_and_shard_validation(tmp_path, prepared, net, reference):
    run, dump = tmp_path / "run", tmp_path / "dump"
    calls_before = len(net.ssh_calls())
    proc = _launch(net, net.horovodrun(slots=1), [
        prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}", f"train.max_updates={UPDATES}",
        "train.validate_at_end=true", "dist.consistency_check_every_updates=3"],
        env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    log = proc.stdout + proc.stderr
    assert f"update {UPDATES}: parameters identical on all 4 ranks" in log, log[-3000:]
    started = sorted(ns for ns, cmd in net.ssh_calls()[calls_before:] if "dist_nmt.train" in cmd)
    assert started == [h.namespace for h in net.hosts[1:]], f"remote workers started in {started}"
    _assert_matches_reference(_assert_ranks_identical(dump), run, reference)
    # Validation decodes a quarter of the dev sample on each rank and gathers the hypotheses in order: the same
    # model (within float tolerance) must give the 1-process run's dev loss and BLEU on the same 16 sentences.
    mine, single = metrics(run, "valid")[-1], metrics(reference, "valid")[-1]
    assert mine["sentences"] == single["sentences"] == 16
    assert mine["bleu"] == pytest.approx(single["bleu"], abs=1e-6)
    assert mine["loss"] == pytest.approx(single["loss"], rel=1e-4)


def test_mpirun_two_hosts_two_slots_equal_one_process(tmp_path, prepared, net, reference):
    run, dump = tmp_path / "run", tmp_path / "dump"
    launcher = net.mpirun(slots=2, hosts=net.hosts[:2])
    proc = _launch(net, launcher, [prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}",
                                   f"train.max_updates={UPDATES}"], env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    assert "training transformer on 4 process(es)" in proc.stdout + proc.stderr
    remote = [ns for ns, cmd in net.ssh_calls() if "orted" in cmd]
    assert net.hosts[1].namespace in remote, f"mpirun started no orted on {net.hosts[1].name}: {net.ssh_calls()}"
    _assert_matches_reference(_assert_ranks_identical(dump), run, reference)


def test_fp16_compression_on_two_hosts_two_slots(tmp_path, prepared, net, reference):
    run, dump = tmp_path / "run", tmp_path / "dump"
    calls_before = len(net.ssh_calls())
    _launch(net, net.horovodrun(slots=2, hosts=net.hosts[:2]), [
        prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}", f"train.max_updates={UPDATES}",
        "dist.compression=fp16"], env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    # horovodrun started hostb's two ranks as local ranks 0 and 1 of 2 (local_size > 1 on a remote host).
    workers = [cmd for ns, cmd in net.ssh_calls()[calls_before:] if "dist_nmt.train" in cmd]
    assert len(workers) == 2 and all("HOROVOD_LOCAL_SIZE=2" in c for c in workers), workers
    assert {c.split("HOROVOD_LOCAL_RANK=")[1].split()[0] for c in workers} == {"0", "1"}
    params = _assert_ranks_identical(dump)
    np.testing.assert_allclose(_losses(run), _losses(reference), rtol=FP16_LOSS_RTOL)
    single = _ckpt(reference, UPDATES)
    assert any(not np.array_equal(params[k], single[k]) for k in params), "fp16 run equals fp32: no compression?"


def test_lossy_link_still_trains(tmp_path, prepared, net, reference):
    """20 % of the packets hostb sends are dropped at random; TCP retransmits, training is unchanged (but slow:
    6-40 s per update here when both directions lose 20 %)."""
    run = tmp_path / "run"
    net.shape(net.hosts[1], loss_pct=20)
    _launch(net, net.horovodrun(slots=1, hosts=net.hosts[:2]), [
        prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}", "train.max_updates=4"])
    assert net.dropped(net.hosts[1]) > 100, "the link lost no packets: loss emulation did not take effect"
    np.testing.assert_allclose(_losses(run), _losses(reference)[:4], rtol=1e-4)
    single, mine = _ckpt(reference, 4), _ckpt(run, 4)
    for name, value in mine.items():
        np.testing.assert_allclose(value, single[name], atol=PARAM_ATOL, err_msg=name)


LINK_DOWN_GLOO_TIMEOUT = 60
# A rank blocked on a dead peer raises after the Gloo timeout; horovodrun then stops every worker.
LINK_DOWN_BOUND_SECONDS = LINK_DOWN_GLOO_TIMEOUT + 60


def _pull_link_after_first_checkpoint(net: sim.SimCluster, args: list[str], env: dict[str, str], run: Path,
                                      out: Path, wait_seconds: float) -> float:
    """Start the job, take host 4's link down once a checkpoint exists; seconds until the job ended (non-zero)."""
    with out.open("w") as sink:
        job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while not list((run / "checkpoints").glob("ckpt-*")) and time.time() < deadline and job.poll() is None:
            time.sleep(1)
        assert list((run / "checkpoints").glob("ckpt-*")), f"no checkpoint written\n{out.read_text()[-3000:]}"
        net.set_link(net.hosts[3], up=False)
        pulled_at = time.time()
        job.wait(timeout=wait_seconds)
        took = time.time() - pulled_at
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, out.read_text()[-3000:]
    return took


def test_link_down_ends_job_within_bound_and_relaunch_on_two_hosts_resumes(tmp_path, prepared, net):
    run, out = tmp_path / "run", tmp_path / "job.log"
    common = [prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}"]
    args = [*net.exec_in(net.hosts[0]), *net.horovodrun(slots=1), PYTHON, "-m", "dist_nmt.train", "--config", TINY,
            *common, "train.max_updates=100000", "train.save_every_updates=3"]
    env = net.env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   "HOROVOD_GLOO_TIMEOUT_SECONDS": str(LINK_DOWN_GLOO_TIMEOUT)})
    took = _pull_link_after_first_checkpoint(net, args, env, run, out, LINK_DOWN_BOUND_SECONDS + 30)
    assert took < LINK_DOWN_BOUND_SECONDS, f"job took {took:.0f} s to end after the link went down"
    _assert_nothing_left(net)

    saved = int(sorted((run / "checkpoints").glob("ckpt-*"))[-1].name.split("-")[1])
    proc = _launch(net, net.horovodrun(slots=1, hosts=net.hosts[:2]), [*common, f"train.max_updates={saved + 3}"])
    log = proc.stdout + proc.stderr
    assert f"at update {saved}" in log and "training transformer on 2 process(es)" in log, log[-3000:]
    assert "different global batch" not in log  # data_shards=4: the same global batches on 2 ranks as on 4
    assert sorted((run / "checkpoints").glob("ckpt-*"))[-1].name == f"ckpt-{saved + 3:08d}"


# ---- longer variants: pytest -m cluster_slow (make test-cluster-slow) ----

@pytest.mark.cluster_slow
def test_mpirun_four_hosts_one_slot_equal_one_process(tmp_path, prepared, net, reference):
    run, dump = tmp_path / "run", tmp_path / "dump"
    _launch(net, net.mpirun(slots=1), [prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}",
                                       f"train.max_updates={UPDATES}"], env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    _assert_matches_reference(_assert_ranks_identical(dump), run, reference)


@pytest.mark.cluster_slow
@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_hierarchical_allreduce_two_hosts_two_slots(tmp_path, prepared, net, reference, launcher):
    """Sockeye turns it on; horovod#1390 reports errors with it on MXNet (GPU/NCCL). Here (CPU build: no
    hierarchical all-reduce op, only MPIHierarchicalAllgather) training must be unchanged."""
    run, dump = tmp_path / "run", tmp_path / "dump"
    hosts = net.hosts[:2]
    launch = net.horovodrun(slots=2, hosts=hosts) if launcher == "gloo" else net.mpirun(slots=2, hosts=hosts)
    _launch(net, launch, [prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}", f"train.max_updates={UPDATES}",
                          "dist.hierarchical_allreduce=true"], env={"DIST_NMT_DUMP_PARAMS": str(dump)})
    _assert_matches_reference(_assert_ranks_identical(dump), run, reference)


def _link_bytes(net: sim.SimCluster, host: sim.SimHost) -> int:
    out = subprocess.run([sim.IP, "-n", host.namespace, "-s", "-j", "link", "show", net.nic], capture_output=True,
                         text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


@pytest.mark.cluster_slow
def test_fp16_compression_halves_the_bytes_between_hosts(tmp_path, prepared, net):
    updates, moved = 8, {}
    for compression in ("none", "fp16"):
        before = _link_bytes(net, net.hosts[1])
        _launch(net, net.horovodrun(slots=1, hosts=net.hosts[:2]), [
            prepared, *FAST, *DETERMINISTIC, f"train.run_dir={tmp_path / compression}",
            f"train.max_updates={updates}", f"dist.compression={compression}"])
        moved[compression] = _link_bytes(net, net.hosts[1]) - before
    # Start-up (rendezvous, broadcast of fp32 parameters, checkpoint-free here) is the same in both runs.
    assert moved["fp16"] < 0.75 * moved["none"], moved


@pytest.mark.cluster_slow
def test_mpirun_link_down_ends_job_within_bound_without_orphans(tmp_path, prepared, net):
    """Open MPI's TCP paths never time out by themselves, and Horovod's stall check cannot fire while rank 0 is
    blocked in an MPI collective: without keepalive on ORTE's daemon connections the job hangs (seen here: still
    running 5 min after the cable was pulled). With it, mpirun notices the lost daemon and aborts the job, and the
    cut-off host's daemon notices the lost mpirun and kills its rank."""
    run, out = tmp_path / "run", tmp_path / "job.log"
    keepalive = ["--mca", "oob_tcp_keepalive_time", "10", "--mca", "oob_tcp_keepalive_intvl", "5",
                 "--mca", "oob_tcp_keepalive_probes", "3"]
    args = [*net.exec_in(net.hosts[0]), *net.mpirun(slots=1), *keepalive, PYTHON, "-m", "dist_nmt.train",
            "--config", TINY, prepared, *FAST, *DETERMINISTIC, f"train.run_dir={run}", "train.max_updates=100000",
            "train.save_every_updates=3", "dist.stall_check_seconds=10", "dist.stall_shutdown_seconds=30"]
    env = net.env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    took = _pull_link_after_first_checkpoint(net, args, env, run, out, 300)
    assert took < 120, f"job took {took:.0f} s to end after the link went down"
    _assert_nothing_left(net, seconds=30)
