"""Train a translation model, on one process or many.

    python -m dist_nmt.train --config configs/tiny.yaml                        # single-process debug mode
    python -m dist_nmt.train --config configs/multi30k.yaml train.max_updates=200
    horovodrun -np 4 python -m dist_nmt.train --config configs/multi30k.yaml  # data-parallel, same code path

Re-running the same command on an existing run directory resumes from its newest good checkpoint. Every rank runs
the same number of updates from the same length bucket at each step; every decision that changes control flow
(stop, skip, best, early stop) comes from a collective, so ranks never disagree and Horovod never hangs.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from dist_nmt import allocator, distributed
from dist_nmt.progress import Progress, TrainingError

log = logging.getLogger("dist_nmt.train")  # not "__main__" under python -m


@dataclass
class StepStats:
    """What one update did (sums over this rank's micro-batches)."""

    loss_sum: float
    nll_sum: float
    grad_norm: float
    skipped: bool


class StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint and exit at the next update boundary."""

    def __init__(self) -> None:
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signum


def train_step(model, trainer, batches: list[dict], ctx, scale: float, clip_norm: float, label_smoothing: float,
               num_tgt_global: float, world_size: int) -> StepStats:
    """Forward/backward every micro-batch, all-reduce, clip on the true gradient norm, update (or skip).

    The loss is a token *sum*; dividing by the all-reduced target-token count happens once, in the optimizer's
    rescale: DistributedTrainer sums gradients over ranks and folds 1/world_size into its scale, so
    `update(num_tgt_global * scale * clip / world_size)` yields mean-per-token gradients, unscaled and clipped.
    Reduced gradients are identical on every rank, so the skip decision (non-finite norm) is too.
    """
    import mxnet as mx

    from dist_nmt.loss import label_smoothed_nll
    from dist_nmt.validate import to_nd

    loss_sum = nll_sum = 0.0
    for arrays in batches:
        nd = to_nd(arrays, ctx)
        with mx.autograd.record():
            logits = model(nd["src"], nd["src_valid_len"], nd["tgt_in"], nd["tgt_valid_len"])
            loss, nll = label_smoothed_nll(logits, nd["tgt_out"], nd["tgt_valid_len"], label_smoothing)
            scaled = loss * scale
        scaled.backward()
        loss_sum += loss.asscalar()
        nll_sum += nll.asscalar()
    trainer.allreduce_grads()
    grads = [p.grad(ctx) for p in trainer._params if p.grad_req != "null"]
    sum_sq = mx.nd.multi_sum_sq(*grads, num_arrays=len(grads)).sum().asscalar()
    grad_norm = float(sum_sq) ** 0.5 / (num_tgt_global * scale)
    finite = bool(abs(grad_norm) < float("inf"))
    if finite:
        clip = max(1.0, grad_norm / clip_norm) if clip_norm > 0 else 1.0
        trainer.update(num_tgt_global * scale * clip / world_size)
    for grad in grads:
        grad[:] = 0
    return StepStats(loss_sum, nll_sum, grad_norm, not finite)


def _build_model(cfg, vocab_size: int, ctx):
    import mxnet as mx

    from dist_nmt.models import build_model
    from dist_nmt.precision import init_amp

    # Loss scaling stays with our LossScaler (one state machine over reduced gradients), so amp.init_trainer is
    # deliberately not called: it would install a second scaler.
    init_amp(cfg.precision.dtype)
    hparams = getattr(cfg.model, cfg.model.arch)
    model = build_model(cfg.model.arch, hparams, vocab_size)
    mx.random.seed(cfg.train.seed)
    model.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0), ctx=ctx)
    model.collect_params().setattr("grad_req", "add")  # accumulate micro-batches; zeroed after each update
    if cfg.train.hybridize:
        model.hybridize(static_alloc=True)
    return model


def _make_optimizer(cfg, model):
    return distributed.make_trainer(model.collect_params(), "adam", {
        "learning_rate": cfg.optim.lr, "beta1": cfg.optim.beta1, "beta2": cfg.optim.beta2,
        "epsilon": cfg.optim.epsilon, "wd": cfg.optim.weight_decay,
        "multi_precision": cfg.precision.dtype == "fp16"},  # fp32 master weights under AMP
        compression=cfg.dist.compression)


def _next_position(epoch: int, index: int, batches_per_epoch: int) -> tuple[int, int]:
    return (epoch + 1, 0) if index + 1 >= batches_per_epoch else (epoch, index + 1)


def _nan_injection(spec: str, world_size: int) -> set[tuple[int, int]]:
    """Fault injection for tests: "5,7@1" makes update 5 (all ranks) and update 7 (rank 1) produce NaN gradients."""
    out: set[tuple[int, int]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        update, _, rank = item.partition("@")
        ranks = [int(rank)] if rank else range(world_size)
        out.update((int(update), r) for r in ranks)
    return out


def _seed_for(seed: int, update: int, rank: int) -> int:
    # Dropout masks are a pure function of (seed, update, rank): a resumed run draws exactly the same ones.
    return (seed * 1_000_003 + update * 7_919 + rank) % (2**31 - 1)


def train(cfg, stop: StopSignal | None = None) -> dict:
    """Train `cfg` to completion (or until stopped), checkpointing in `cfg.train.run_dir`; return a summary.

    `stop` remembers SIGTERM/SIGINT/SIGUSR1 (install it as early as possible; a fresh one is made if None).
    """
    import mxnet as mx
    from tqdm import tqdm

    from dist_nmt.checkpoint import Checkpointer
    from dist_nmt.metrics import MetricsWriter, setup_logging
    from dist_nmt.precision import LossScaler, check_precision
    from dist_nmt.run import (
        RunData,
        check_consistency,
        dump_params,
        evaluate_test,
        log_update,
        restore,
        save,
        start_run_dir,
        validate,
    )
    from dist_nmt.schedule import lr_at

    t, world = cfg.train, distributed.init_world(cfg.dist)
    setup_logging(world.rank, world.size, t.run_dir)
    ctx = distributed.device(world)
    check_precision(cfg.precision.dtype, ctx.device_type == "gpu")
    data = RunData.load(cfg, world)
    model = _build_model(cfg, data.vocab.size, ctx)
    trainer = _make_optimizer(cfg, model)
    p = cfg.precision
    scaler = LossScaler(p.init_scale, p.growth_interval, p.growth_factor, p.backoff_factor, p.min_scale,
                        enabled=p.loss_scaling == "dynamic")
    checkpointer = Checkpointer(t.run_dir, t.keep_last)
    progress = restore(cfg, model, trainer, scaler, checkpointer, world, ctx, data.batches_per_epoch)
    distributed.broadcast_parameters(model.collect_params())
    start_run_dir(cfg, world)
    writer = MetricsWriter(t.run_dir, world.is_primary)
    stop, start = stop or StopSignal(), time.time()
    injected = _nan_injection(os.environ.get("DIST_NMT_INJECT_NAN", ""), world.size)
    log.info("training %s on %d process(es), %d batches/epoch/rank, from update %d (epoch %d, batch %d)",
             cfg.model.arch, world.size, data.batches_per_epoch, progress.update, progress.epoch,
             progress.batch_index)
    log.info("threads: OMP_NUM_THREADS=%s; allocator: %s", os.environ.get("OMP_NUM_THREADS"), allocator.status())
    bar = tqdm(total=t.max_updates or None, initial=progress.update, unit="upd", dynamic_ncols=True,
               disable=not (world.is_primary and t.progress_bar and sys.stderr.isatty()))
    window = {"loss": 0.0, "nll": 0.0, "tgt": 0.0, "src": 0.0, "start": time.time(), "slots": 0.0}
    reason = "max_updates" if t.max_updates and progress.update >= t.max_updates else ""
    last_eval = -1
    while not reason:
        batches, slots, position = [], 0, (progress.epoch, progress.batch_index)
        for _ in range(t.accum_steps):
            for batch in data.batches_at(*position):
                batches.append(data.collate_train(batch))
                slots += batch.src_pad_len * batches[-1]["src"].shape[0]
            position = _next_position(*position, data.batches_per_epoch)
        out_of_time = bool(t.max_time_minutes) and (time.time() - start) / 60 >= t.max_time_minutes
        num_tgt, num_src, stop_votes, time_votes = distributed.allreduce_sum(
            [sum(b["num_tgt_tokens"] for b in batches), sum(b["num_src_tokens"] for b in batches),
             float(bool(stop.received)), float(out_of_time)], name=f"step.{progress.update}")
        if stop_votes or time_votes:
            reason = "signal" if stop_votes else "max_time_minutes"
            break
        progress.update, (progress.epoch, progress.batch_index) = progress.update + 1, position
        mx.random.seed(_seed_for(t.seed, progress.update, world.rank))
        trainer.set_learning_rate(lr_at(progress.update, cfg.optim.lr, cfg.optim.warmup_updates,
                                        cfg.optim.warmup_init_lr))
        scale = scaler.scale * (float("nan") if (progress.update, world.rank) in injected else 1.0)
        stats = train_step(model, trainer, batches, ctx, scale, cfg.optim.clip_norm,
                           cfg.optim.label_smoothing, num_tgt, world.size)
        _account(progress, scaler, stats, t.max_consecutive_bad_updates, checkpointer)
        bar.update(1)
        window.update(loss=window["loss"] + stats.loss_sum, nll=window["nll"] + stats.nll_sum,
                      tgt=window["tgt"] + num_tgt, src=window["src"] + num_src, slots=window["slots"] + slots)
        if progress.update % t.log_every_updates == 0:
            log_update(progress, window, trainer.learning_rate, scaler, writer, world, start)
        is_best = False
        if progress.update % t.eval_every_updates == 0:
            is_best, last_eval = validate(cfg, model, data, progress, writer, world, ctx), progress.update
            if t.patience and progress.evals_without_improvement >= t.patience:
                reason = "patience"
        if cfg.dist.consistency_check_every_updates and \
                progress.update % cfg.dist.consistency_check_every_updates == 0:
            check_consistency(model, world, progress.update)
        if progress.update % t.save_every_updates == 0 or is_best:
            save(checkpointer, model, trainer, progress, scaler, cfg, world, data.batches_per_epoch, is_best)
        if t.max_updates and progress.update >= t.max_updates:
            reason = "max_updates"
        elif t.max_epochs and progress.epoch >= t.max_epochs:
            reason = "max_epochs"
    bar.close()
    log.info("stopping at update %d: %s", progress.update, reason)
    # The last stretch since the previous validation counts too: without this a time-budgeted run would test the
    # model from the last multiple of eval_every_updates (up to eval_every_updates - 1 updates older).
    is_best = (t.validate_at_end and reason != "signal" and progress.update > 0 and progress.update != last_eval
               and validate(cfg, model, data, progress, writer, world, ctx))
    save(checkpointer, model, trainer, progress, scaler, cfg, world, data.batches_per_epoch, is_best)
    if os.environ.get("DIST_NMT_DUMP_PARAMS"):
        dump_params(model, os.environ["DIST_NMT_DUMP_PARAMS"], world)
    summary = {"updates": progress.update, "reason": reason, "best_bleu": progress.best_bleu,
               "skipped_updates": progress.num_skipped_updates, "completed": reason != "signal"}
    if reason != "signal":
        summary.update(evaluate_test(cfg, model, data, checkpointer, writer, world, ctx, progress.update))
    writer.close()
    return summary


def _account(progress: Progress, scaler, stats: StepStats, max_bad: int, checkpointer) -> None:
    """Count skipped updates; K in a row is fatal (the last good checkpoint stays intact)."""
    skipped = scaler.update(not stats.skipped)
    if not skipped:
        progress.bad_updates_in_a_row = 0
        return
    progress.num_skipped_updates += 1
    progress.bad_updates_in_a_row += 1
    log.warning("update %d skipped: non-finite loss or gradients (%d in a row, %d in total)%s", progress.update,
                progress.bad_updates_in_a_row, progress.num_skipped_updates,
                f"; loss scale now {scaler.scale:g}" if scaler.enabled else "")
    if progress.bad_updates_in_a_row >= max_bad:
        good = checkpointer.latest_good()
        raise TrainingError(
            f"{progress.bad_updates_in_a_row} consecutive updates had non-finite loss or gradients "
            f"(train.max_consecutive_bad_updates={max_bad}); stopping. Last good checkpoint: {good or 'none yet'}. "
            "Lower optim.lr or raise optim.warmup_updates, and check the data.")


def main(argv: list[str] | None = None) -> int:
    """`python -m dist_nmt.train --config FILE [key=value ...]`; returns the process exit code."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dist_nmt.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_updates=20")
    args = parser.parse_args(argv)
    if argv is None:  # a real command line: re-executes once with tcmalloc preloaded (see dist_nmt.allocator)
        allocator.preload_tcmalloc(["-m", "dist_nmt.train", *sys.argv[1:]])
    stop = StopSignal()  # before the slow start-up, so an early preemption signal is not fatal
    distributed.configure_threads()  # before mxnet is imported: OpenMP reads it once
    from dist_nmt.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dist_nmt.checkpoint import CheckpointError
    from dist_nmt.data.text import DataError
    from dist_nmt.precision import PrecisionError

    try:
        summary = train(cfg, stop)
    except (TrainingError, CheckpointError, DataError, PrecisionError) as err:
        logging.getLogger("dist_nmt").error("%s", err)
        distributed.shutdown()
        return 1
    distributed.shutdown(barrier=True)
    return 0 if summary["completed"] else 143


if __name__ == "__main__":
    sys.exit(main())
