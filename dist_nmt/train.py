"""Train a translation model, on one process or many.

    python -m dist_nmt.train --config configs/tiny.yaml                        # single-process debug mode
    python -m dist_nmt.train --config configs/multi30k.yaml train.max_updates=200
    horovodrun -np 4 python -m dist_nmt.train --config configs/multi30k.yaml  # data-parallel, same code path

`python -m dist_nmt.train ARGS` is an alias of `dist-nmt train ARGS`. Re-running the same command on an existing run
directory resumes from its newest good checkpoint. Every rank runs the same number of updates from the same length
bucket at each step; every decision that changes control flow (stop, skip, best, early stop) comes from a
collective, so ranks never disagree and Horovod never hangs.
"""
from __future__ import annotations

if __name__ == "__main__":  # the CLI sets up the process (allocator, threads, signals) before MXNet is imported
    import sys

    from dist_nmt.cli import main

    sys.exit(main(["train", *sys.argv[1:]], reexec_argv=["-m", "dist_nmt.train", *sys.argv[1:]]))

# Below this line MXNet is imported: dist_nmt.environment.init() must have run (the CLI does it first).
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import mxnet as mx
from tqdm import tqdm

from dist_nmt import allocator, distributed, environment, ops
from dist_nmt.checkpoint import Checkpointer, Progress, TrainState
from dist_nmt.config import Config, save_config
from dist_nmt.data import RunData, next_position
from dist_nmt.data.identity import IDENTITY_FILE, check_prepared_current, data_identity
from dist_nmt.data.testsets import TestSet, resolve_test_sets
from dist_nmt.environment import StopSignal
from dist_nmt.errors import TrainingError
from dist_nmt.final_model import choose_final_model
from dist_nmt.hooks import FaultHooks, test_device
from dist_nmt.metrics import MetricsWriter, TrainWindow, setup_logging
from dist_nmt.models import build_model
from dist_nmt.precision import LossScaler, check_precision, init_amp, resolve_dtype
from dist_nmt.preflight import check_run_dir, check_test_references
from dist_nmt.runlock import RunLock
from dist_nmt.schedule import lr_at
from dist_nmt.step import StepStats, seed_for, train_step
from dist_nmt.validate import Validator, score_test_set, write_test_scores
from dist_nmt.watchdog import Watchdog

log = logging.getLogger("dist_nmt.train")  # not "__main__" under python -m


def uses_fused_ops(cfg: Config, ctx: mx.Context) -> bool:
    """Whether the model and the loss run on the fused CPU ops (`model.fused_ops`; loads the library if needed)."""
    return ops.resolve(cfg.model.fused_ops, on_gpu=ctx.device_type == "gpu")


def resolve_precision(cfg: Config, ctx: mx.Context) -> Config:
    """`cfg` with `precision.dtype: auto` replaced by what runs on `ctx` (`dist_nmt.precision.resolve_dtype`)."""
    dtype = resolve_dtype(cfg.precision.dtype, ctx.device_type == "gpu", environment.AMX_STATUS)
    if dtype == cfg.precision.dtype:
        return cfg
    log.info("precision.dtype=auto: training in %s (oneDNN AMX: %s)", dtype, environment.AMX_STATUS)
    return dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=dtype))


def build_model_for(cfg: Config, vocab_size: int, ctx: mx.Context) -> mx.gluon.HybridBlock:
    """The configured model, initialised on `ctx` (same seed on every rank), accumulating gradients."""
    # Loss scaling stays with our LossScaler (one state machine over reduced gradients), so amp.init_trainer is
    # deliberately not called: it would install a second scaler.
    cfg, on_gpu = resolve_precision(cfg, ctx), ctx.device_type == "gpu"
    fused = uses_fused_ops(cfg, ctx)  # every rank, before building
    attention = ops.resolve_attention(cfg.model.attention_impl, fused, on_gpu, cfg.precision.dtype) \
        if cfg.model.arch == "transformer" else None
    init_amp(cfg.precision.dtype)  # after the library load, which would replace AMP's wrapped mx.sym functions
    model = build_model(cfg.model.arch, getattr(cfg.model, cfg.model.arch), vocab_size, fused_ops=fused,
                        attention_impl=attention)
    mx.random.seed(cfg.train.seed)
    model.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0), ctx=ctx)
    model.collect_params().setattr("grad_req", "add")  # accumulate micro-batches; zeroed after each update
    if cfg.train.hybridize:
        model.hybridize(static_alloc=True)
    return model


def make_optimizer(cfg: Config, model: mx.gluon.Block):
    """Adam behind Horovod's DistributedTrainer (fp32 master weights under fp16 AMP)."""
    o = cfg.optim
    return distributed.make_trainer(model.collect_params(), "adam", {
        "learning_rate": o.lr, "beta1": o.beta1, "beta2": o.beta2, "epsilon": o.epsilon, "wd": o.weight_decay,
        "multi_precision": cfg.precision.dtype == "fp16"}, compression=cfg.dist.compression)


def train(cfg: Config, stop: StopSignal | None = None) -> dict:
    """Train `cfg` to completion (or until stopped), checkpointing in `cfg.train.run_dir`; return a summary.

    `stop` remembers SIGTERM/SIGINT/SIGUSR1 (install it as early as possible; a fresh one is made if None).
    """
    t, world = cfg.train, distributed.init_world(cfg.dist)
    check_run_dir(t.run_dir)
    lock = None
    if world.is_primary:  # before anything is written there, so a second trainer changes nothing
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(t.run_dir)
    try:
        return _train(cfg, world, stop)
    finally:
        if lock is not None:
            lock.release()


def _check_inputs(cfg: Config) -> dict:
    """Before any work: prepared data current with the raw inputs, test references usable; the data identity."""
    check_prepared_current(cfg.data)
    check_test_references(cfg.data)
    return data_identity(cfg.data.prepared_dir)


def _train(cfg: Config, world: distributed.World, stop: StopSignal | None) -> dict:
    run = _Run.start(cfg, world, stop)
    reason = _loop(run)
    log.info("stopping at update %d: %s", run.state.progress.update, reason)
    return _finish(run, reason)


@dataclasses.dataclass
class _Run:
    """Everything one training run holds between its set-up, its update loop and its final test."""

    cfg: Config
    world: distributed.World
    ctx: mx.Context
    data: RunData
    state: TrainState
    checkpointer: Checkpointer
    validator: Validator
    writer: MetricsWriter
    dog: Watchdog
    hooks: FaultHooks
    stop: StopSignal
    tests: list[TestSet]
    fused_loss: bool
    start: float
    last_eval: int = -1

    @classmethod
    def start(cls, cfg: Config, world: distributed.World, stop: StopSignal | None) -> _Run:
        """Check the inputs, build the model, restore the newest good checkpoint; every rank, in this order."""
        t = cfg.train
        setup_logging(world.rank, world.size, t.run_dir)
        ctx = test_device(world.rank) or distributed.device(world)
        cfg = resolve_precision(cfg, ctx)
        check_precision(cfg.precision.dtype, ctx.device_type == "gpu", cfg.precision.loss_scaling)
        identity = _check_inputs(cfg)
        tests = resolve_test_sets(cfg.data)  # fail fast on a missing or misaligned test file, not after training
        data = RunData.load(cfg.data, t, world.rank, world.size)
        model = build_model_for(cfg, data.vocab.size, ctx)
        p = cfg.precision
        scaler = LossScaler(p.init_scale, p.growth_interval, p.growth_factor, p.backoff_factor, p.min_scale,
                            enabled=p.loss_scaling == "dynamic")
        state = TrainState(model, make_optimizer(cfg, model), scaler, Progress())
        checkpointer = Checkpointer(t.run_dir, t.keep_last, world.is_primary, cfg, data_identity=identity)
        checkpointer.restore(state, ctx, data.batches_per_epoch)
        distributed.broadcast_parameters(model.collect_params())
        if world.is_primary:
            save_config(cfg, Path(t.run_dir) / "config.yaml")
            (Path(t.run_dir) / IDENTITY_FILE).write_text(json.dumps(identity, indent=1))
        dog = Watchdog.start(cfg.dist.heartbeat_timeout_seconds, world.rank, world.size,
                             Path(t.run_dir) / "heartbeat", lambda: str(checkpointer.last_good or ""))
        fused_loss = uses_fused_ops(cfg, ctx)
        validator = Validator(model, data.vocab, world, ctx, cfg.decode, cfg.data.max_len, fused_loss)
        progress = state.progress
        log.info("training %s on %d process(es), %d batches/epoch/rank, from update %d (epoch %d, batch %d)",
                 cfg.model.arch, world.size, data.batches_per_epoch, progress.update, progress.epoch,
                 progress.batch_index)
        log.info("threads: OMP_NUM_THREADS=%s; allocator: %s; oneDNN primitive cache: %s; precision %s; "
                 "oneDNN AMX: %s", os.environ.get("OMP_NUM_THREADS"), allocator.status(),
                 allocator.primitive_cache_status(), cfg.precision.dtype, environment.AMX_STATUS)
        return cls(cfg, world, ctx, data, state, checkpointer, validator, MetricsWriter(t.run_dir, world.is_primary),
                   dog, FaultHooks.from_env(world.size), stop or StopSignal(), tests, fused_loss, time.time())


def _loop(run: _Run) -> str:
    """Updates until a stop condition, which it returns: max_updates, max_epochs, max_time_minutes, patience, signal.

    Every rank takes the same decisions (the stop and time votes are all-reduced)."""
    t, progress, state = run.cfg.train, run.state.progress, run.state
    bar = tqdm(total=t.max_updates or None, initial=progress.update, unit="upd", dynamic_ncols=True,
               disable=not (run.world.is_primary and t.progress_bar and sys.stderr.isatty()))
    window = TrainWindow()
    reason = "max_updates" if t.max_updates and progress.update >= t.max_updates else ""
    while not reason:
        batches, position = _next_batches(run.data, progress, t.accum_steps)
        out_of_time = bool(t.max_time_minutes) and (time.time() - run.start) / 60 >= t.max_time_minutes
        num_tgt, stop_votes, time_votes = distributed.allreduce_sum(
            [sum(b.num_tgt_tokens for b in batches), float(bool(run.stop.received)), float(out_of_time)],
            name=f"step.{progress.update}")
        if stop_votes or time_votes:
            reason = "signal" if stop_votes else "max_time_minutes"
            break
        progress.update, (progress.epoch, progress.batch_index) = progress.update + 1, position
        mx.random.seed(seed_for(t.seed, progress.update, run.world.rank))
        state.trainer.set_learning_rate(lr_at(progress.update, run.cfg.optim, run.cfg.train.max_updates))
        scale = state.scaler.scale * run.hooks.loss_scale_factor(progress.update, run.world.rank)
        stats = train_step(state.model, state.trainer, batches, run.ctx, scale, run.cfg.optim, num_tgt,
                           run.fused_loss)
        run.dog.tick()
        _account(progress, state.scaler, stats, t.max_consecutive_bad_updates, run.checkpointer)
        bar.update(1)
        window.add(stats.loss_sum, stats.nll_sum, batches)
        if progress.update % t.log_every_updates == 0:
            _log_update(progress, window, state.trainer.learning_rate, state.scaler, run.writer, run.start)
            window = TrainWindow()
        reason = _after_update(run)
    bar.close()
    return reason


def _after_update(run: _Run) -> str:
    """The periodic work after an update (validation, consistency check, checkpoint); a stop reason or ""."""
    t, progress, reason = run.cfg.train, run.state.progress, ""
    is_best = False
    if progress.update % t.eval_every_updates == 0:
        with run.dog.phase("validation"):
            is_best, run.last_eval = _validate(run.validator, run.data, run.cfg, progress, run.writer), progress.update
        if t.patience and progress.evals_without_improvement >= t.patience:
            reason = "patience"
    every = run.cfg.dist.consistency_check_every_updates
    if every and progress.update % every == 0:
        digest = distributed.check_consistency(run.state.model.collect_params(), progress.update)
        log.info("update %d: parameters identical on all %d ranks (sha256 %s)", progress.update, run.world.size,
                 digest[:12])
    if progress.update % t.save_every_updates == 0 or is_best:
        with run.dog.phase("checkpoint save"):
            run.checkpointer.save_state(run.state, run.world.size, run.data.batches_per_epoch, is_best)
    if t.max_updates and progress.update >= t.max_updates:
        return "max_updates"
    return "max_epochs" if t.max_epochs and progress.epoch >= t.max_epochs else reason


def _finish(run: _Run, reason: str) -> dict:
    """Validate the last stretch, save, and (unless stopped by a signal) test the final model; the summary."""
    t, progress = run.cfg.train, run.state.progress
    # The last stretch since the previous validation counts too: without this a time-budgeted run would test the
    # model from the last multiple of eval_every_updates (up to eval_every_updates - 1 updates older).
    with run.dog.phase("final validation, checkpoint and test"):
        is_best = (t.validate_at_end and reason != "signal" and progress.update > 0
                   and progress.update != run.last_eval
                   and _validate(run.validator, run.data, run.cfg, progress, run.writer))
        run.checkpointer.save_state(run.state, run.world.size, run.data.batches_per_epoch, is_best)
        run.hooks.dump_params(run.state.model, run.world.rank)
        summary = _summary(progress, reason)
        if reason != "signal" and run.tests:
            summary.update(_test(run.validator, run.data, run.tests, run.checkpointer, run.cfg, run.writer,
                                 progress))
    run.dog.stop()
    run.writer.close()
    return summary


def _next_batches(data: RunData, progress: Progress, accum_steps: int) -> tuple[list, tuple[int, int]]:
    """This rank's collated micro-batches of the next update and the data position after them."""
    batches, position = [], (progress.epoch, progress.batch_index)
    for _ in range(accum_steps):
        batches += [data.collate_train(plan) for plan in data.batches_at(*position)]
        position = next_position(*position, data.batches_per_epoch)
    return batches, position


def _summary(progress: Progress, reason: str) -> dict:
    """What `train` returns (before the test scores): updates done, why it stopped, best dev BLEU, skips."""
    return {"updates": progress.update, "reason": reason, "best_bleu": progress.best_bleu,
            "skipped_updates": progress.num_skipped_updates, "completed": reason != "signal"}


def _validate(validator: Validator, data: RunData, cfg: Config, progress: Progress, writer: MetricsWriter) -> bool:
    """Validate, update best BLEU / patience in `progress`, log; return whether this is the best model so far."""
    values = validator.dev(data, cfg.optim.label_smoothing, cfg.train.eval_sample_sentences, progress.update)
    is_best = values["bleu"] > progress.best_bleu
    if is_best:
        progress.best_bleu, progress.evals_without_improvement = values["bleu"], 0
    else:
        progress.evals_without_improvement += 1
    log.info("validation at update %d | loss %.3f | ppl %.2f | BLEU %.2f on %d dev sentences%s | %.1f s | %s",
             progress.update, values["loss"], values["ppl"], values["bleu"], values["sentences"],
             " (best)" if is_best else "", values["seconds"], values.pop("bleu_signature"))
    writer.write("valid", progress.update, values)
    return is_best


def _test(validator: Validator, data: RunData, tests: list[TestSet], checkpointer: Checkpointer, cfg: Config,
          writer: MetricsWriter, progress: Progress) -> dict:
    """Score every test set with the final model: best checkpoint or last-k average, whichever is better on dev."""
    choice = choose_final_model(validator, data, checkpointer, cfg.train, cfg.optim.label_smoothing,
                                progress.best_bleu, progress.update)
    per_set = [score_test_set(validator, s, cfg.data.tgt_lang, cfg.train.run_dir, choice.describe()) for s in tests]
    for test_set, scores in zip(tests, per_set, strict=True):
        numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        writer.write("test" if test_set.is_primary else f"test.{test_set.name}", progress.update, numbers)
    if validator.world.is_primary:
        return write_test_scores(cfg.train.run_dir, per_set, choice.name, choice.dev_bleu)
    return {**per_set[0], "model": choice.name}


def _log_update(progress: Progress, window: TrainWindow, lr: float, scaler: LossScaler, writer: MetricsWriter,
                start: float) -> None:
    """One log line and metrics record over the updates since the last one (a collective)."""
    values = window.log_values(progress.update)
    values.update(lr=lr, epoch=progress.epoch, skipped=progress.num_skipped_updates, loss_scale=scaler.scale,
                  elapsed_min=(time.time() - start) / 60)
    log.info("update %d | epoch %d | loss %.3f | ppl %.2f | lr %.2e | %.0f tok/s | pad eff src %.2f tgt %.2f | "
             "peak RSS %.2f GB | %.1f min", progress.update, progress.epoch + 1, values["loss"], values["ppl"], lr,
             values["tokens_per_s"], values["padding_efficiency_src"], values["padding_efficiency_tgt"],
             values["peak_rss_gb"], values["elapsed_min"])
    writer.write("train", progress.update, values)


def _account(progress: Progress, scaler: LossScaler, stats: StepStats, max_bad: int,
             checkpointer: Checkpointer) -> None:
    """Count skipped updates; K in a row is fatal (the last good checkpoint stays intact)."""
    skipped = scaler.update(not stats.skipped)
    if not skipped:
        progress.bad_updates_in_a_row = 0
        return
    progress.num_skipped_updates += 1
    if not scaler.backing_off:  # overflows while the scale can still fall are bounded by the scaler's min_scale
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
