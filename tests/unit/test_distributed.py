"""The Horovod seam: only dist_nmt/distributed.py imports horovod; a plain process is a world of one."""
import os
import re
from pathlib import Path

import numpy as np

from dist_nmt import distributed

PACKAGE = Path(__file__).resolve().parents[2] / "dist_nmt"


def test_horovod_imported_only_in_distributed_py():
    pattern = re.compile(r"^\s*(import horovod|from horovod)", re.M)
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()) and p.name != "distributed.py"]
    assert offenders == []


def test_models_import_only_mxnet_gluonnlp_and_models():
    pattern = re.compile(r"^\s*(?:from|import) (dist_nmt\.(?!models)\S+)", re.M)
    offenders = {str(p): pattern.findall(p.read_text()) for p in (PACKAGE / "models").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_threads_split_cores_over_local_processes(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "4")
    assert distributed.configure_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.configure_threads() == 3  # the user's setting wins


def test_single_process_world_without_launcher():
    world = distributed.init_world()
    assert (world.rank, world.size, world.is_primary) == (0, 1, True)
    assert distributed.allreduce_sum(np.array([2.0, 3.0]), name="t").tolist() == [2.0, 3.0]
    assert distributed.broadcast_object({"a": 1}, name="b") == {"a": 1}
    assert distributed.allgather_object(5, name="g") == [5]


def test_horovod_cycle_time_defaults_to_10ms_on_cpu_and_the_environment_wins(monkeypatch):
    from dist_nmt.config import DistConfig

    for var in ("HOROVOD_CYCLE_TIME", "HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                "HOROVOD_GLOO_TIMEOUT_SECONDS", "HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS"):
        monkeypatch.delenv(var, raising=False)  # also restores them after the test
    distributed._set_horovod_env(DistConfig(stall_check_seconds=7))
    assert os.environ["HOROVOD_CYCLE_TIME"] == "10.0"  # no GPU on the test machines
    assert os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "7"
    monkeypatch.delenv("HOROVOD_CYCLE_TIME")
    distributed._set_horovod_env(DistConfig(cycle_time_ms=2.5))
    assert os.environ["HOROVOD_CYCLE_TIME"] == "2.5"
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "1")
    distributed._set_horovod_env(DistConfig(cycle_time_ms=2.5))
    assert os.environ["HOROVOD_CYCLE_TIME"] == "1"  # what the user exported wins


def test_hierarchical_allreduce_reaches_horovod_only_when_asked(monkeypatch):
    from dist_nmt.config import DistConfig

    for var in ("HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_CYCLE_TIME", "HOROVOD_STALL_CHECK_TIME_SECONDS",
                "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "HOROVOD_GLOO_TIMEOUT_SECONDS", "HOROVOD_CONTROLLER",
                "HOROVOD_CPU_OPERATIONS"):
        monkeypatch.delenv(var, raising=False)
    distributed._set_horovod_env(DistConfig())
    assert "HOROVOD_HIERARCHICAL_ALLREDUCE" not in os.environ
    distributed._set_horovod_env(DistConfig(hierarchical_allreduce=True))
    assert os.environ["HOROVOD_HIERARCHICAL_ALLREDUCE"] == "1"


def test_unknown_gradient_compression_names_the_choices():
    import pytest

    with pytest.raises(ValueError, match="choose one of: none, fp16"):
        distributed.make_trainer({}, "sgd", {}, compression="int8")
