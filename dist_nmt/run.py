"""Everything around the training loop that touches the run directory and the data: loading the prepared data,
resuming, saving, validating, logging and the final test evaluation. Kept out of `train.py` so its loop fits on a
screen; all functions here are called on every rank and do their own primary-only I/O.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dist_nmt import distributed
from dist_nmt.checkpoint import Checkpointer, load_arrays, load_optimizer_state
from dist_nmt.config import Config, config_hash, flatten, save_config, shape_diff
from dist_nmt.data import (
    Batch,
    BatchPlan,
    BatchStream,
    DataError,
    EncodedSplit,
    Vocab,
    collate,
    padding_efficiency,
    read_lines,
    split_paths,
    vocab_path,
)
from dist_nmt.progress import Progress, TrainingError
from dist_nmt.validate import DecodeJob, decode_and_score, dev_loss, sample_indices

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """Prepared data a run needs: vocabulary, encoded train/dev splits, this rank's batch streams, dev text.

    The global batch is `data_shards` batches (default: one per rank) of at most `train.max_tokens` each, times
    `train.accum_steps`. Each rank runs `data_shards / world_size` of the shards as extra micro-batches, so a fixed
    `train.data_shards` gives bit-for-bit the same global batches on any world size that divides it (resume a 4-rank
    checkpoint on 2 ranks, or check a 2-rank run against a 1-rank run).
    """

    vocab: Vocab
    train: EncodedSplit
    dev: EncodedSplit
    streams: list[BatchStream]
    dev_batches: list[BatchPlan]
    dev_sources: list[str]
    dev_references: list[str]
    data_shards: int

    @classmethod
    def load(cls, cfg: Config, world: distributed.World) -> RunData:
        """Open the arrays written by `dist-nmt prepare`; error with the fix if they are missing."""
        prepared = Path(cfg.data.prepared_dir)
        if not (prepared / "manifest.json").is_file():
            raise DataError(f"no prepared data in {prepared} (data.prepared_dir); run "
                            f"`dist-nmt prepare --config <your config>` first")
        shards = cfg.train.data_shards or world.size
        if shards % world.size:
            raise DataError(f"train.data_shards={shards} must be a multiple of the number of processes "
                            f"({world.size}); use a multiple of {world.size}, or 0 for one shard per rank")
        train, dev = EncodedSplit.load(prepared, "train"), EncodedSplit.load(prepared, "dev")
        per_rank = shards // world.size
        streams = [BatchStream(train.src_lengths, train.tgt_lengths, cfg.train.max_tokens, cfg.train.seed,
                               world.rank * per_rank + i, shards) for i in range(per_rank)]
        dev_stream = BatchStream(dev.src_lengths, dev.tgt_lengths, cfg.train.max_tokens, 0, world.rank, world.size)
        src_path, tgt_path = split_paths(cfg.data, "dev")
        return cls(Vocab.load(vocab_path(prepared)), train, dev, streams, dev_stream.epoch_batches(0),
                   list(read_lines(src_path)), list(read_lines(tgt_path)), shards)

    @property
    def batches_per_epoch(self) -> int:
        """Global steps per epoch (equal on every rank by construction)."""
        return self.streams[0].batches_per_epoch

    def batches_at(self, epoch: int, index: int) -> list[BatchPlan]:
        """This rank's batches (one per local data shard, all of one bucket) at data position (epoch, index)."""
        return [stream.epoch_batches(epoch)[index] for stream in self.streams]

    def collate_train(self, plan: BatchPlan) -> Batch:
        """numpy arrays for one training batch."""
        return collate(self.train, plan)


def restore(cfg: Config, model, trainer, scaler, checkpointer: Checkpointer, world: distributed.World, ctx,
            batches_per_epoch: int):
    """Resume from the newest good checkpoint rank 0 sees (same one on every rank), or start fresh."""
    found = checkpointer.latest_good() if world.is_primary else None
    path = distributed.broadcast_object(str(found) if found else "", name="resume.path")
    if not path:
        return Progress()
    arrays, state = load_arrays(path)
    changed = shape_diff(state["config"], flatten(cfg))
    if changed:
        raise TrainingError(
            f"{cfg.train.run_dir} holds a checkpoint of a different model ({path}); these keys differ: "
            + ", ".join(f"{k} (checkpoint {state['config'].get(k)!r}, now {flatten(cfg).get(k)!r})" for k in changed)
            + ". Use a new train.run_dir or restore the old values.")
    model.load_parameters(str(Path(path) / "model.params"), ctx=ctx)
    load_optimizer_state(trainer, arrays, state["optimizer_update_counts"], ctx)
    scaler.load_state_dict(state["scaler"])
    progress = Progress(**state["progress"])
    if state["batches_per_epoch"] != batches_per_epoch:
        # The global batch changed (data shards = world size, and the world size changed): continue the same
        # epoch at the same fraction of it. With a fixed train.data_shards this never happens.
        fraction = progress.batch_index / max(1, state["batches_per_epoch"])
        progress.batch_index = min(int(fraction * batches_per_epoch), batches_per_epoch - 1)
        log.warning("resuming a %d-process checkpoint on %d processes with a different global batch: epoch %d "
                    "continues at step %d of %d (set train.data_shards to keep batches identical across world sizes)",
                    state["world_size"], world.size, progress.epoch + 1, progress.batch_index, batches_per_epoch)
    log.info("resumed from %s at update %d", path, progress.update)
    return progress


def save(checkpointer: Checkpointer, model, trainer, progress, scaler, cfg: Config, world: distributed.World,
         batches_per_epoch: int, is_best: bool) -> None:
    """Primary writes a checkpoint; the others wait for nothing (no collective here)."""
    if not world.is_primary or (checkpointer.directory / f"ckpt-{progress.update:08d}").is_dir() and not is_best:
        return  # already written at this update (e.g. by the periodic save just before stopping)
    state = {"update": progress.update, "progress": asdict(progress), "scaler": scaler.state_dict(),
             "world_size": world.size, "batches_per_epoch": batches_per_epoch, "config_hash": config_hash(cfg),
             "config": flatten(cfg), "time": time.time()}
    checkpointer.save(model, trainer, state, is_best=is_best)


def start_run_dir(cfg: Config, world: distributed.World) -> None:
    """Write the resolved config into the run directory (primary only)."""
    if world.is_primary:
        Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.train.run_dir) / "config.yaml")


def log_update(progress, window: dict, lr: float, scaler, writer, world: distributed.World, start: float) -> None:
    """One log line + metrics record over the updates since the last one; resets `window`."""
    loss_sum, nll_sum = distributed.allreduce_sum([window["loss"], window["nll"]], name=f"log.{progress.update}")
    src_slots, tgt_slots = distributed.allreduce_sum([window["src_slots"], window["tgt_slots"]],
                                                     name=f"slots.{progress.update}")
    pad = padding_efficiency(window["src"], window["tgt"], src_slots, tgt_slots)
    seconds = max(time.time() - window["start"], 1e-9)
    tgt = max(window["tgt"], 1.0)
    values = {"loss": loss_sum / tgt, "ppl": float(np.exp(min(nll_sum / tgt, 50.0))), "lr": lr,
              "tokens_per_s": (window["tgt"] + window["src"]) / seconds,
              "padding_efficiency": pad.combined, "padding_efficiency_src": pad.src,
              "padding_efficiency_tgt": pad.tgt,
              "epoch": progress.epoch, "skipped": progress.num_skipped_updates, "loss_scale": scaler.scale,
              "elapsed_min": (time.time() - start) / 60}
    log.info("update %d | epoch %d | loss %.3f | ppl %.2f | lr %.2e | %.0f tok/s | pad eff src %.2f tgt %.2f | "
             "%.1f min", progress.update, progress.epoch + 1, values["loss"], values["ppl"], lr,
             values["tokens_per_s"], pad.src, pad.tgt, values["elapsed_min"])
    writer.write("train", progress.update, values)
    window.update(loss=0.0, nll=0.0, tgt=0.0, src=0.0, src_slots=0.0, tgt_slots=0.0, start=time.time())


def validate(cfg: Config, model, data: RunData, progress, writer, world: distributed.World, ctx) -> bool:
    """Dev loss on the whole dev set and BLEU on a bounded sample; returns whether this is the best so far."""
    t0 = time.time()
    values = dev_loss(model, data.dev, data.dev_batches, cfg.optim.label_smoothing, ctx,
                      name=f"devloss.{progress.update}")
    sample = sample_indices(len(data.dev_sources), cfg.train.eval_sample_sentences)
    job = DecodeJob([data.dev_sources[i] for i in sample], [data.dev_references[i] for i in sample],
                    cfg.decode, cfg.data.max_len)
    scores, _ = decode_and_score(model, data.vocab, job, world, ctx, name=f"devbleu.{progress.update}")
    values.update(bleu=scores["bleu"], seconds=time.time() - t0, sentences=len(sample))
    is_best = scores["bleu"] > progress.best_bleu
    if is_best:
        progress.best_bleu, progress.evals_without_improvement = scores["bleu"], 0
    else:
        progress.evals_without_improvement += 1
    log.info("validation at update %d | loss %.3f | ppl %.2f | BLEU %.2f on %d dev sentences%s | %.1f s | %s",
             progress.update, values["loss"], values["ppl"], scores["bleu"], len(sample),
             " (best)" if is_best else "", values["seconds"], scores["bleu_signature"])
    writer.write("valid", progress.update, values)
    return is_best


def evaluate_test(cfg: Config, model, data: RunData, checkpointer: Checkpointer, writer,
                  world: distributed.World, ctx, update: int) -> dict:
    """Decode the full test split with the best checkpoint (if any) and log the BLEU line."""
    if not cfg.data.test:
        return {}
    best = checkpointer.directory / "best" / "model.params"
    has_best = distributed.broadcast_object(best.is_file() if world.is_primary else False, name="test.best")
    if has_best:
        model.load_parameters(str(best), ctx=ctx)
        distributed.broadcast_parameters(model.collect_params(), name="test.params")
    src_path, tgt_path = split_paths(cfg.data, "test")
    tok_refs = list(read_lines(Path(cfg.data.root) / cfg.data.test_tok_ref)) if cfg.data.test_tok_ref else []
    job = DecodeJob(list(read_lines(src_path)), list(read_lines(tgt_path)), cfg.decode,
                    cfg.data.max_len, cfg.data.tgt_lang, tok_refs)
    t0 = time.time()
    scores, hyps = decode_and_score(model, data.vocab, job, world, ctx, name="test.decode")
    scores.update(model="best" if has_best else "final", sentences=len(hyps),
                  decode_seconds=round(time.time() - t0, 1))
    if world.is_primary:
        out = Path(cfg.train.run_dir) / f"test.hyp.{cfg.data.tgt_lang}"
        out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        (Path(cfg.train.run_dir) / "test_scores.json").write_text(json.dumps(scores, indent=1))
        tok = f" | tokenized lowercase BLEU {scores['tok_bleu']:.2f}" if "tok_bleu" in scores else ""
        log.info("TEST %s (%s model, %d sentences): sacreBLEU %.2f | chrF %.2f%s | %s", src_path.name,
                 scores["model"], len(hyps), scores["bleu"], scores["chrf"], tok, scores["bleu_signature"])
    writer.write("test", update, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return scores


def params_digest(model) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests mean bit-identical parameters."""
    import hashlib

    digest = hashlib.sha256()
    params = model.collect_params()
    for name in sorted(params.keys()):
        digest.update(params[name].data().asnumpy().tobytes())
    return digest.hexdigest()


def check_consistency(model, world: distributed.World, update: int) -> None:
    """Abort if any rank's parameters differ from rank 0's (a desynchronised job trains garbage silently)."""
    digests = distributed.allgather_object(params_digest(model), name=f"digest.{update}")
    bad = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise TrainingError(f"parameters diverged across ranks at update {update}: ranks {bad} differ from rank 0. "
                            "This is a bug or a hardware fault; resume from the last checkpoint.")
    log.info("update %d: parameters identical on all %d ranks (sha256 %s)", update, world.size, digests[0][:12])


def dump_params(model, directory: str, world: distributed.World) -> None:
    """Test hook (DIST_NMT_DUMP_PARAMS=dir): every rank writes its parameters to dir/rank<r>.params."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    model.save_parameters(str(Path(directory) / f"rank{world.rank}.params"), deduplicate=True)
