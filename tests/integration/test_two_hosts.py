"""Two hosts for real: `horovodrun --gloo` starts one worker in each of two network namespaces joined by a veth
link (tests/integration/netns.py), the trainer runs a few updates, and both hosts end with bit-identical
parameters — with the all-reduce traffic measured on the link, so a job that stayed on loopback fails.

    ip netns exec dnmt-h1 horovodrun -np 2 -H 10.231.0.1:1,10.231.0.2:1 --gloo --network-interface nic0 \\
        python -m dist_nmt.train --config configs/tiny.yaml ...
"""
import mxnet as mx
import numpy as np
import pytest

from integration import netns
from support import FAST, PYTHON, ROOT, TINY, run_cli

HOROVODRUN = str(ROOT / ".venv" / "bin" / "horovodrun")
UPDATES = 8


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    reason = netns.available()
    if reason:
        pytest.skip(f"two-host test: {reason}")
    hosts = netns.TwoHosts.create(tmp_path_factory.mktemp("two-hosts"))
    yield hosts
    hosts.destroy()  # runs when the test fails too; also kills workers a timed-out job left behind


def _load(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def test_one_worker_per_host_trains_to_identical_parameters_over_the_link(tmp_path, prepared, two_hosts):
    run, dump = tmp_path / "run", tmp_path / "dump"  # shared filesystem: visible in both namespaces
    h1, h2 = two_hosts.hosts
    # --disable-cache: horovodrun otherwise reuses ssh/NIC check results from ~/.horovod for an hour.
    launch = [*two_hosts.exec_in(h1), HOROVODRUN, "-np", "2", "-H", two_hosts.horovod_hosts(), "--gloo",
              "--network-interface", two_hosts.nic, "--disable-cache"]
    # With Gloo, horovodrun forwards the launching environment to every worker (`-x` is MPI-only). The Gloo
    # timeout is below the test's own, so a link that does not connect fails with Gloo's message, not a timeout.
    env = two_hosts.env({"OMP_NUM_THREADS": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": "120",
                         "DIST_NMT_DUMP_PARAMS": str(dump)})
    rx_before, tx_before = two_hosts.link_bytes(h1)
    proc = run_cli([*launch, PYTHON, "-m", "dist_nmt.train", "--config", TINY, prepared, *FAST,
                    f"train.run_dir={run}", f"train.max_updates={UPDATES}", "dist.consistency_check_every_updates=4"],
                   env=env, timeout=240)
    rx_after, tx_after = two_hosts.link_bytes(h1)

    workers = [ns for ns, cmd in two_hosts.ssh_calls() if "dist_nmt.train" in cmd]
    assert workers == [h2.namespace], f"expected rank 1 started by ssh in {h2.namespace}, got {workers}"
    log = proc.stdout + proc.stderr
    for update in (4, UPDATES):
        assert f"update {update}: parameters identical on all 2 ranks" in log, log[-3000:]

    rank0, rank1 = _load(dump / "rank0.params"), _load(dump / "rank1.params")
    assert rank0 and rank0.keys() == rank1.keys()
    differ = [name for name in rank0 if not np.array_equal(rank0[name], rank1[name])]
    assert not differ, f"hosts hold different parameters: {differ}"

    # Each update all-reduces every gradient: with 2 ranks each side sends and receives about one model's worth
    # of bytes, so the link must carry several models' worth both ways. Loopback traffic does not count here.
    param_bytes = sum(a.nbytes for a in rank0.values())
    sent, received = tx_after - tx_before, rx_after - rx_before
    assert min(sent, received) > UPDATES // 2 * param_bytes, (
        f"{h1.namespace}:{two_hosts.nic} sent {sent} B, received {received} B; parameters are {param_bytes} B")
