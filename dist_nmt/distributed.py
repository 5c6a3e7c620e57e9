"""The one seam to Horovod: a small `World` and the few collectives the trainer needs.

Only this module imports horovod. With no launcher (plain `python -m dist_nmt.train`) it initialises a
one-process Gloo world, so the single-process debug mode runs exactly the same code path; every collective then
degrades to an identity.

    world = init_world(cfg.dist)            # after configure_threads(), before building the model
    trainer = make_trainer(params, "adam", {"learning_rate": 1e-3}, compression="fp16")  # dist.compression
    total = allreduce_sum(np.array([num_tgt_tokens], np.float64), name=f"ntok.{update}")

Horovod 0.28.1 + MXNet facts this module encodes (see FIELD_NOTES): DistributedTrainer *sums* gradients and folds
1/size into `trainer._scale`; every ad-hoc collective needs a unique name; stall/Gloo timeouts must be set in the
environment before `hvd.init()` or a dead rank hangs the job forever.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_nmt.config import DistConfig
from dist_nmt.errors import TrainingError

log = logging.getLogger(__name__)

# Horovod's background thread wakes every cycle to negotiate ready tensors with the other ranks. When each rank has
# one core to itself, that wake-up steals compute from the rank's own OpenMP threads: with Horovod's default cycle,
# transformer_base at np=2 on a 2-core host (one core per rank) scaled at 0.83, with 10 ms at 0.90-0.92 in three runs
# (scripts/bench_scaling.py --pin). CPU steps take seconds, so 10 ms of negotiation latency is noise; GPU steps do
# not, so with GPUs Horovod's own default stays.
CPU_CYCLE_TIME_MS = 10.0

# Environment variables set by the launchers we support, in order of preference.
_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
_LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


@dataclass(frozen=True)
class World:
    """Who this process is among the workers."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_primary(self) -> bool:
        """Rank 0 writes checkpoints, logs at INFO and scores BLEU."""
        return self.rank == 0


def launched() -> bool:
    """True when a launcher (horovodrun, mpirun, srun) started this process."""
    return any(v in os.environ for v in _RANK_VARS)


def local_size_hint() -> int:
    """Processes on this host, read from the launcher's environment before Horovod starts (1 if unknown)."""
    for var in _LOCAL_SIZE_VARS:
        value = os.environ.get(var, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def configure_threads() -> int:
    """Set OMP_NUM_THREADS (and MXNet engine threads) to cores / local processes unless the user set them.

    Must run before mxnet is imported: OpenMP reads the variable once at start-up. On this kind of machine MXNet
    otherwise uses one core (FIELD_NOTES: 158 vs 324 GFLOP/s for a large FullyConnected).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_size_hint())
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    os.environ.setdefault("MXNET_OMP_MAX_THREADS", os.environ["OMP_NUM_THREADS"])
    return int(os.environ["OMP_NUM_THREADS"])


def _set_horovod_env(dist: DistConfig) -> None:
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(dist.stall_check_seconds))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(dist.stall_shutdown_seconds))
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(dist.gloo_timeout_seconds))
    if dist.hierarchical_allreduce:
        # Read once by hvd.init(). Horovod 0.28.1 implements hierarchical all-reduce for NCCL (GPUs) only; the CPU
        # Gloo and MPI all-reduces ignore it (the simulated-cluster tests check training is unchanged with it on).
        os.environ.setdefault("HOROVOD_HIERARCHICAL_ALLREDUCE", "1")
    cycle_ms = dist.cycle_time_ms or (0.0 if _has_gpus() else CPU_CYCLE_TIME_MS)
    if cycle_ms:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cycle_ms))
    if not launched():
        # No launcher: a one-process Gloo world instead of initialising MPI (FIELD_NOTES).
        os.environ.setdefault("HOROVOD_CONTROLLER", "gloo")
        os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "gloo")


def _has_gpus() -> bool:
    import mxnet as mx

    return mx.context.num_gpus() > 0


def init_world(dist: DistConfig | None = None) -> World:
    """Initialise Horovod (idempotent) and return this process's World.

    `dist` sets the stall/shutdown and Gloo timeouts (a dead rank ends the job instead of hanging it) and the
    background thread's cycle time; variables already in the environment win.
    """
    _set_horovod_env(dist or DistConfig())
    import horovod.mxnet as hvd

    if not hvd.is_initialized():
        hvd.init()
    world = World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    log.debug("world %s", world)
    return world


def device(world: World) -> Any:
    """One GPU per local rank when GPUs exist, else the CPU. Refuses more local ranks than GPUs."""
    import mxnet as mx

    num_gpus = mx.context.num_gpus()
    if num_gpus == 0:
        return mx.cpu()
    if world.local_size > num_gpus:
        # local_rank % num_gpus would put two ranks on one GPU: half speed and often out of memory, silently.
        raise TrainingError(f"{world.local_size} processes on this host but only {num_gpus} GPU(s): start at most "
                            f"{num_gpus} per host (horovodrun -np <gpus> -H host:<gpus>) or set "
                            "CUDA_VISIBLE_DEVICES to match.")
    return mx.gpu(world.local_rank)


COMPRESSIONS = ("none", "fp16")


def make_trainer(params: Any, optimizer: str, optimizer_params: dict, compression: str = "none") -> Any:
    """A Horovod DistributedTrainer over `net.collect_params()` (a dict, never a list) whose all-reduce *sums*.

    Horovod 0.28.1 picks the normalisation itself: on CPU (and NCCL < 2.10) it sums and folds 1/size into
    `trainer._scale`; with NCCL >= 2.10 it averages inside the collective. Either way the gradient norm seen between
    the all-reduce and the update would depend on that choice (1/size of the truth in the second case, so clipping
    would start at size x clip_norm). Here both branches are pinned to one convention: reduced gradients are sums
    over ranks and the optimizer's scale is untouched, so `update(trainer, divisor)` is the only normalisation.

    `compression="fp16"` casts each fp32 gradient to fp16 for the all-reduce and back (half the bytes on the wire,
    fp16 rounding of the summed gradient); every rank decompresses the same reduced tensor, so ranks stay
    bit-identical. A summed gradient beyond fp16's range (65,504) becomes inf: the update is skipped on every rank.
    """
    import horovod.mxnet as hvd

    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown gradient compression {compression!r}; choose one of: {', '.join(COMPRESSIONS)}")
    codec = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
    trainer = hvd.DistributedTrainer(params, optimizer, optimizer_params, compression=codec)
    sum_in_collective(trainer)
    return trainer


def sum_in_collective(trainer: Any) -> None:
    """Make a DistributedTrainer's all-reduce a plain sum and undo any 1/size folded into its scale."""
    if trainer._average_in_framework:
        trainer._scale = trainer._optimizer.rescale_grad
    trainer._average_in_framework = True  # => allreduce_(average=False): the collective sums
    trainer._postscale_factor = 1.0
    trainer._gradient_predivide_factor = 1.0


def reduced_grads(trainer: Any) -> list:
    """All-reduce (sum over ranks) every trainable gradient in place and return them, in parameter order."""
    trainer.allreduce_grads()
    return [p.list_grad()[0] for p in trainer._params if p.grad_req != "null"]


def apply_update(trainer: Any, divisor: float) -> None:
    """One optimizer step on the reduced (summed) gradients, each divided by `divisor` first.

    `divisor` = global target tokens x loss scale x clip factor turns summed token-sum gradients into mean-per-token,
    unscaled, clipped ones on every rank alike.
    """
    trainer.update(divisor)


def zero_grads(grads: list) -> None:
    """Reset accumulated (`grad_req='add'`) gradients after an update, in one multi-tensor op."""
    import mxnet as mx

    mx.nd.reset_arrays(*grads, num_arrays=len(grads))


def broadcast_parameters(params: Any, name: str = "params") -> None:
    """Copy rank 0's parameter values to every rank (after initialisation or checkpoint load)."""
    import horovod.mxnet as hvd

    if hvd.size() > 1:
        hvd.broadcast_parameters(params, root_rank=0, prefix=f"{name}.")


def allreduce_sum(values: np.ndarray, name: str) -> np.ndarray:
    """Sum a small float64 numpy vector over ranks (name must be unique per call site and step)."""
    import horovod.mxnet as hvd
    import mxnet as mx

    if hvd.size() == 1:
        return np.asarray(values, dtype=np.float64)
    summed = hvd.allreduce(mx.nd.array(values, dtype=np.float64), average=False, name=name)
    return summed.asnumpy()


def allreduce_array_(array: Any, name: str) -> Any:
    """Sum an NDArray over ranks in place and return it (no host copies: for benchmarks and large tensors)."""
    import horovod.mxnet as hvd

    if hvd.size() > 1:
        hvd.allreduce_(array, average=False, name=name)
    return array


def broadcast_object(obj: Any, name: str) -> Any:
    """Rank 0's value of a small picklable object, on every rank (for control decisions)."""
    import horovod.mxnet as hvd

    if hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_object(obj: Any, name: str) -> list:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    import horovod.mxnet as hvd

    if hvd.size() == 1:
        return [obj]
    return hvd.allgather_object(obj, name=name)


def params_digest(params: Any) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests mean bit-identical parameters."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(params.keys()):
        digest.update(params[name].data().asnumpy().tobytes())
    return digest.hexdigest()


def check_consistency(params: Any, update: int) -> str:
    """Abort if any rank's parameters differ from rank 0's (a desynchronised job trains garbage silently)."""
    digests = allgather_object(params_digest(params), name=f"digest.{update}")
    bad = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise TrainingError(f"parameters diverged across ranks at update {update}: ranks {bad} differ from rank 0. "
                            "This is a bug or a hardware fault; resume from the last checkpoint.")
    return digests[0]


def shutdown(barrier: bool = False) -> None:
    """Tear Horovod down (safe to call when it never started).

    MXNet runs collectives asynchronously: rank 0 can leave its last broadcast before the others have received it,
    and a rank that exits early makes mpirun/horovodrun kill the rest (e.g. rank 0 mid-checkpoint). After a normal
    end, `barrier=True` makes every rank wait for all the others before shutting down.
    """
    try:
        import horovod.mxnet as hvd
        import mxnet as mx
    except ImportError:
        return
    if not hvd.is_initialized():
        return
    mx.nd.waitall()
    if barrier and hvd.size() > 1:
        hvd.allreduce(mx.nd.zeros((1,)), average=False, name="shutdown.barrier").wait_to_read()
    hvd.shutdown()
