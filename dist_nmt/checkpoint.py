"""Atomic full-state checkpoints: write to a temp directory, fsync, rename; verify sha256s on load.

Layout of one checkpoint directory `checkpoints/ckpt-00001000/`:
  model.params      parameters (MXNet `save_parameters`)
  optimizer.nd      optimizer state arrays keyed "<param index>.<slot>" (no pickled optimizer object)
  state.json        update, data position (epoch, batch index), per-parameter update counts, loss scaler,
                    best BLEU, config hash and flattened config
  MANIFEST.json     sha256 of the three files above; written last, so a checkpoint without it is incomplete

`checkpoints/best/` holds the best-by-BLEU checkpoint in the same layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import mxnet as mx

log = logging.getLogger(__name__)

_FILES = ("model.params", "optimizer.nd", "state.json")
_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_state(trainer: Any) -> tuple[dict[str, mx.nd.NDArray], dict[str, int]]:
    """Optimizer state arrays and per-parameter update counts of a gluon Trainer (one device)."""
    updater = trainer._updaters[0]
    arrays: dict[str, mx.nd.NDArray] = {}
    for index, state in updater.states.items():
        slots = state if isinstance(state, (tuple, list)) else (state,)
        for slot, value in enumerate(slots):
            if value is not None:
                arrays[f"{index}.{slot}"] = value
    counts = {str(k): int(v) for k, v in trainer._optimizer._index_update_count.items()}
    return arrays, counts


def load_optimizer_state(trainer: Any, arrays: dict[str, mx.nd.NDArray], counts: dict[str, int],
                         ctx: mx.Context) -> None:
    """Inverse of `optimizer_state`: restore Adam moments and the bias-correction step counts."""
    updater = trainer._updaters[0]
    by_index: dict[int, dict[int, mx.nd.NDArray]] = {}
    for key, value in arrays.items():
        index, slot = (int(p) for p in key.split("."))
        by_index.setdefault(index, {})[slot] = value.as_in_context(ctx)
    updater.states = {i: tuple(s[k] for k in sorted(s)) if len(s) > 1 else s[0] for i, s in by_index.items()}
    updater.states_synced = dict.fromkeys(updater.states, True)
    opt = trainer._optimizer
    opt._index_update_count.clear()
    opt._index_update_count.update({int(k): v for k, v in counts.items()})
    opt.num_update = max(counts.values(), default=0)


class Checkpointer:
    """Writes (primary rank only) and finds checkpoints under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | Path, keep_last: int) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, model: Any, trainer: Any, state: dict, is_best: bool = False) -> Path:
        """Write checkpoint `ckpt-<update>` atomically; also refresh `best/` when `is_best`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"ckpt-{state['update']:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_parameters(str(tmp / "model.params"), deduplicate=True)
        arrays, counts = optimizer_state(trainer)
        mx.nd.save(str(tmp / "optimizer.nd"), arrays)
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_update_counts": counts}, indent=1))
        self._seal(tmp)
        shutil.rmtree(final, ignore_errors=True)
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
        tmp = self.directory / f".tmp-best-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        old = self.directory / f".old-best-{os.getpid()}"
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
        """Newest checkpoint that verifies; corrupt ones are skipped with a warning."""
        for path in reversed(self.list()):
            try:
                verify(path)
                return path
            except CheckpointError as err:
                log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", err)
        return None


def verify(path: str | Path) -> dict:
    """Check every file against MANIFEST.json; return the parsed state.json."""
    path = Path(path)
    manifest_path = path / "MANIFEST.json"
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
    return json.loads((path / "state.json").read_text())


def load_arrays(path: str | Path) -> tuple[dict[str, mx.nd.NDArray], dict]:
    """Verified optimizer arrays and state of a checkpoint directory."""
    state = verify(path)
    return mx.nd.load(str(Path(path) / "optimizer.nd")), state


def average_params(paths: list[Path], out_file: str | Path) -> None:
    """Average the model parameters of several checkpoints into one params file (Vaswani et al.)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, mx.nd.NDArray] = {}
    for path in paths:
        verify(path)
        for name, value in mx.nd.load(str(Path(path) / "model.params")).items():
            total[name] = total[name] + value if name in total else value.copy()
    out_file = Path(out_file)
    tmp = out_file.with_name(out_file.name + ".tmp")
    mx.nd.save(str(tmp), {name: value / len(paths) for name, value in total.items()})
    os.replace(tmp, out_file)
