"""Atomic full-state checkpoints: write to a temp directory, fsync, rename; verify sha256s on load.

Layout of one checkpoint directory `checkpoints/ckpt-00001000/`:
  model.params      parameters (MXNet `save_parameters`)
  optimizer.nd      optimizer state arrays keyed "<param index>.<slot>" (no pickled optimizer object)
  state.json        update, data position (epoch, batch index), per-parameter update counts, loss scaler,
                    best BLEU, config hash and flattened config
  MANIFEST.json     sha256 of the three files above; written last, so a checkpoint without it is incomplete

`checkpoints/best/` holds the best-by-BLEU checkpoint in the same layout. A checkpoint that fails verification is
never deleted: it is renamed `<name>.corrupt-<unix time>` (kept for inspection) and rewritten when training reaches
that update again; a corrupt `best/` falls back to the verified checkpoint with the highest recorded BLEU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mxnet as mx

from dist_nmt import distributed
from dist_nmt.config import Config, config_hash, flatten, harmless_diff, shape_diff
from dist_nmt.data.identity import refuse_data_change
from dist_nmt.errors import CheckpointError, TrainingError
from dist_nmt.runlock import remove_stale_temps

log = logging.getLogger(__name__)

_FILES = ("model.params", "optimizer.nd", "state.json")
_NAME = re.compile(r"^ckpt-(\d{8})$")


@dataclass
class Progress:
    """Where training is; saved in every checkpoint's state.json."""

    update: int = 0
    epoch: int = 0
    batch_index: int = 0
    best_bleu: float = -1.0
    evals_without_improvement: int = 0
    bad_updates_in_a_row: int = 0
    num_skipped_updates: int = 0


@dataclass
class TrainState:
    """Everything a checkpoint captures and a resume restores."""

    model: Any  # gluon HybridBlock
    trainer: Any  # gluon Trainer (Horovod DistributedTrainer)
    scaler: Any  # precision.LossScaler
    progress: Progress


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_state(trainer: Any) -> tuple[dict[str, mx.nd.NDArray], dict[str, int]]:
    """Optimizer state arrays (copied to the CPU) and per-parameter update counts of a gluon Trainer (one device).

    The arrays go through the CPU because `mx.nd.save` records each array's context and `mx.nd.load` copies a GPU
    array back onto that context: moments saved from `gpu(0)` would make every rank open a CUDA context on GPU 0.
    The counts are the table of the device this trainer updates on: MXNet keeps one table per device id
    (`Optimizer._set_current_context`, called by the Updater before each update), and `_index_update_count` points
    at the one in use.
    """
    updater = trainer._updaters[0]
    arrays: dict[str, mx.nd.NDArray] = {}
    for index, state in updater.states.items():
        slots = state if isinstance(state, (tuple, list)) else (state,)
        for slot, value in enumerate(slots):
            if value is not None:
                arrays[f"{index}.{slot}"] = value.as_in_context(mx.cpu())
    counts = {str(k): int(v) for k, v in trainer._optimizer._index_update_count.items()}
    return arrays, counts


def load_optimizer_state(trainer: Any, arrays: dict[str, mx.nd.NDArray], counts: dict[str, int],
                         ctx: mx.Context) -> None:
    """Inverse of `optimizer_state`: restore Adam moments and the bias-correction step counts onto `ctx`.

    The counts (saved by rank 0 from its device) are installed as the table of `ctx`'s device id, the one the
    Updater will select; restored into device 0's table, a rank on `gpu(k)` (k > 0) would restart Adam's step count
    at 1 and diverge from the others.
    """
    updater = trainer._updaters[0]
    by_index: dict[int, dict[int, mx.nd.NDArray]] = {}
    for key, value in arrays.items():
        index, slot = (int(p) for p in key.split("."))
        by_index.setdefault(index, {})[slot] = value.as_in_context(ctx)
    updater.states = {i: tuple(s[k] for k in sorted(s)) if len(s) > 1 else s[0] for i, s in by_index.items()}
    updater.states_synced = dict.fromkeys(updater.states, True)
    opt = trainer._optimizer
    opt._index_update_count = {int(k): v for k, v in counts.items()}
    opt._all_index_update_counts = {ctx.device_id: opt._index_update_count}
    opt.num_update = max(counts.values(), default=0)


class Checkpointer:
    """Writes (primary rank only), finds and restores checkpoints under `run_dir/checkpoints`.

    `cfg`, the run's config, is stored in every checkpoint (flattened, with its hash) and compared on resume.
    """

    def __init__(self, run_dir: str | Path, keep_last: int, is_primary: bool = True, cfg: Config | None = None,
                 data_identity: dict | None = None) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.is_primary = is_primary
        self.config = flatten(cfg) if cfg else {}
        self.config_hash = config_hash(cfg) if cfg else ""
        self.data_identity = data_identity
        self.allow_data_change = bool(cfg and cfg.train.allow_data_change)
        self.moved_aside: list[Path] = []
        self.last_good: Path | None = None  # newest checkpoint restored or written (by rank 0) in this run
        if is_primary:
            remove_stale_temps(self.directory)

    def path(self, update: int) -> Path:
        """Directory of the checkpoint written at `update`."""
        return self.directory / f"ckpt-{update:08d}"

    def has(self, update: int) -> bool:
        """A checkpoint of `update` exists on disk (not verified)."""
        return self.path(update).is_dir()

    def best_params(self) -> Path | None:
        """Parameters of a verified `best/`, else of the verified checkpoint with the highest recorded BLEU, else None.

        A `best/` that fails verification is moved aside with a warning (primary only).
        """
        best = self.directory / "best"
        if best.exists():
            try:
                verify(best)
                return best / "model.params"
            except CheckpointError as err:
                log.warning("best checkpoint is unusable: %s; falling back to the verified checkpoint with the "
                            "highest recorded BLEU", err)
                self._move_aside(best)
        scored = []
        for path in self.list():
            try:
                scored.append((verify(path).get("progress", {}).get("best_bleu", -1.0), -path.stat().st_mtime, path))
            except CheckpointError as err:
                log.warning("skipping corrupt checkpoint: %s", err)
        return max(scored)[2] / "model.params" if scored else None

    def _move_aside(self, path: Path) -> Path | None:
        """Rename a checkpoint that failed verification to `<name>.corrupt-<time>` (primary only; never deleted)."""
        if not self.is_primary or not path.exists():
            return None
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        while target.exists():
            target = target.with_name(target.name + "x")
        os.replace(path, target)
        self.moved_aside.append(target)
        log.warning("moved %s aside to %s (kept for inspection; it will be rewritten when training reaches it)",
                    path, target.name)
        return target

    def _verifies(self, path: Path) -> bool:
        try:
            verify(path)
            return True
        except CheckpointError:
            return False

    def save_state(self, state: TrainState, world_size: int, batches_per_epoch: int, is_best: bool) -> None:
        """Primary writes a checkpoint of `state`; the others return at once (no collective here).

        A verified checkpoint already written at this update (e.g. by the periodic save just before stopping) is kept
        unless this one is also the new best; an unverified one is moved aside and rewritten.
        """
        progress = state.progress
        self.last_good = self.path(progress.update)
        if not self.is_primary or (self.has(progress.update) and not is_best and self._verifies(self.path(
                progress.update))):
            return
        meta = {"update": progress.update, "progress": asdict(progress), "scaler": state.scaler.state_dict(),
                "world_size": world_size, "batches_per_epoch": batches_per_epoch,
                "config_hash": self.config_hash, "data_identity": self.data_identity,
                "config": self.config, "time": time.time()}
        self.save(state.model, state.trainer, meta, is_best=is_best)

    def restore(self, state: TrainState, ctx: mx.Context, batches_per_epoch: int) -> None:
        """Resume `state` from the newest good checkpoint rank 0 sees (the same one on every rank), or leave it.

        Refuses a checkpoint of a different model (naming the keys that differ).
        """
        found = self.latest_good() if self.is_primary else None
        path = distributed.broadcast_object(str(found) if found else "", name="resume.path")
        if not path:
            if self.moved_aside:
                log.warning("NO LOADABLE CHECKPOINT in %s: every checkpoint failed verification and was moved aside "
                            "(%s); training starts FROM SCRATCH at update 0", self.directory,
                            ", ".join(p.name for p in self.moved_aside))
            return
        arrays, meta = load_arrays(path)
        self._check_compatible(path, meta)
        self.last_good = Path(path)
        state.model.load_parameters(str(Path(path) / "model.params"), ctx=ctx)
        load_optimizer_state(state.trainer, arrays, meta["optimizer_update_counts"], ctx)
        state.scaler.load_state_dict(meta["scaler"])
        state.progress = Progress(**meta["progress"])
        if meta["batches_per_epoch"] != batches_per_epoch:
            _rescale_position(state.progress, meta, batches_per_epoch)
        log.info("resumed from %s at update %d", path, state.progress.update)

    def _check_compatible(self, path: str, meta: dict) -> None:
        """Refuse a checkpoint of another model or data; log the harmless config changes."""
        changed = shape_diff(meta["config"], self.config)
        if changed:
            raise TrainingError(
                f"{self.directory.parent} holds a checkpoint of a different model ({path}); these keys differ: "
                + ", ".join(f"{k} (checkpoint {meta['config'].get(k)!r}, now {self.config.get(k)!r})"
                            for k in changed) + ". Use a new train.run_dir or restore the old values.")
        if self.data_identity is not None:
            if refuse_data_change(meta.get("data_identity"), self.data_identity, path, self.allow_data_change):
                log.warning("train.allow_data_change=true: continuing %s on changed data", path)
        if self.is_primary:
            for key in harmless_diff(meta["config"], self.config):
                log.info("resume: %s changed from %r to %r", key, meta["config"].get(key), self.config.get(key))

    def save(self, model: Any, trainer: Any, state: dict, is_best: bool = False) -> Path:
        """Write checkpoint `ckpt-<update>` atomically; also refresh `best/` when `is_best`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"ckpt-{state['update']:08d}"
        tmp = self.directory / f".tmp-{os.getpid()}-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_parameters(str(tmp / "model.params"), deduplicate=True)
        arrays, counts = optimizer_state(trainer)
        mx.nd.save(str(tmp / "optimizer.nd"), arrays)
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_update_counts": counts}, indent=1))
        self._seal(tmp)
        if final.exists() and not self._verifies(final):
            self._move_aside(final)
        shutil.rmtree(final, ignore_errors=True)  # a verified one of the same update: replaced by the newer state
        os.replace(tmp, final)
        if is_best:
            self._copy_as_best(final)
        self._prune()
        log.info("saved checkpoint %s%s", final, " (best)" if is_best else "")
        return final

    @staticmethod
    def _seal(tmp: Path) -> None:
        for name in _FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        manifest = {name: _sha256(tmp / name) for name in _FILES}
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))

    def _copy_as_best(self, source: Path) -> None:
        tmp = self.directory / f".tmp-{os.getpid()}-best"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        old = self.directory / f".old-{os.getpid()}-best"
        best = self.directory / "best"
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        for path in self.list()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def list(self) -> list[Path]:
        """Numbered checkpoints, oldest first (not verified)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def latest_good(self) -> Path | None:
        """Newest checkpoint that verifies; corrupt ones are skipped with a warning and moved aside (primary)."""
        for path in reversed(self.list()):
            try:
                verify(path)
                return path
            except CheckpointError as err:
                log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", err)
                self._move_aside(path)
        return None


def _rescale_position(progress: Progress, meta: dict, batches_per_epoch: int) -> None:
    # The global batch changed (data shards = world size, and the world size changed): continue the same epoch at
    # the same fraction of it. With a fixed train.data_shards this never happens.
    fraction = progress.batch_index / max(1, meta["batches_per_epoch"])
    progress.batch_index = min(int(fraction * batches_per_epoch), batches_per_epoch - 1)
    log.warning("resuming a %d-process checkpoint with a different global batch: epoch %d continues at step %d of "
                "%d (set train.data_shards to keep batches identical across world sizes)", meta["world_size"],
                progress.epoch + 1, progress.batch_index, batches_per_epoch)


def verify(path: str | Path) -> dict:
    """Check every file against MANIFEST.json; return the parsed state.json."""
    path = Path(path)
    manifest_path = path / "MANIFEST.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory ({'a file' if path.exists() else 'missing'})")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no MANIFEST.json (checkpoint was not completely written)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    for name in _FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != manifest.get(name):
            raise CheckpointError(f"{file}: sha256 does not match MANIFEST.json (truncated or corrupt)")
    try:
        return json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({err})") from None


def load_arrays(path: str | Path) -> tuple[dict[str, mx.nd.NDArray], dict]:
    """Verified optimizer arrays and state of a checkpoint directory."""
    state = verify(path)
    return mx.nd.load(str(Path(path) / "optimizer.nd")), state


def average_params(paths: list[Path], out_file: str | Path) -> None:
    """Average the model parameters of several checkpoints into one params file (Vaswani et al.)."""
    if not paths:
        raise CheckpointError("no checkpoints to average; train first (or check --run-dir)")
    total: dict[str, mx.nd.NDArray] = {}
    for path in paths:
        verify(path)
        for name, value in mx.nd.load(str(Path(path) / "model.params")).items():
            total[name] = total[name] + value if name in total else value.copy()
    out_file = Path(out_file)
    tmp = out_file.with_name(out_file.name + ".tmp")
    mx.nd.save(str(tmp), {name: value / len(paths) for name, value in total.items()})
    os.replace(tmp, out_file)
