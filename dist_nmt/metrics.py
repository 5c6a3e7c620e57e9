"""What a user watches: log lines, `metrics.jsonl` and TensorBoard events (primary rank only)."""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_nmt import distributed
from dist_nmt.data.batch import Batch, padding_efficiency

log = logging.getLogger(__name__)


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def setup_logging(rank: int, size: int, run_dir: str | Path | None = None) -> None:
    """INFO on rank 0 (also to `run_dir/train.log`); WARNING and above elsewhere, tagged with the rank."""
    tag = f"[rank {rank}/{size}] " if size > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class MetricsWriter:
    """Appends one JSON object per event to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.time()
        self._tb = None
        self._file = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX not installed; TensorBoard events are not written")

    def write(self, kind: str, update: int, values: dict[str, Any]) -> None:
        """Record `values` for `update` under `kind` (train, valid, test)."""
        if not self.enabled:
            return
        record = {"kind": kind, "update": update, "time": round(time.time() - self.start, 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, update)

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


@dataclass
class TrainWindow:
    """Sums over the updates since the last log line (this rank's share; `log_values` all-reduces them)."""

    loss_sum: float = 0.0
    nll_sum: float = 0.0
    num_src_tokens: float = 0.0
    num_tgt_tokens: float = 0.0
    src_slots: float = 0.0  # padded positions the model computed, dummy rows included
    tgt_slots: float = 0.0
    start: float = field(default_factory=time.time)

    def add(self, loss_sum: float, nll_sum: float, batches: Sequence[Batch]) -> None:
        """Account one update's micro-batches."""
        self.loss_sum += loss_sum
        self.nll_sum += nll_sum
        for b in batches:
            self.num_src_tokens += b.num_src_tokens
            self.num_tgt_tokens += b.num_tgt_tokens
            self.src_slots += b.src_slots
            self.tgt_slots += b.tgt_slots

    def log_values(self, update: int) -> dict[str, float]:
        """Loss, perplexity, tokens/s, per-side padding efficiency and the largest peak RSS over all ranks
        (collectives)."""
        totals = distributed.allreduce_sum(
            [self.loss_sum, self.nll_sum, self.num_src_tokens, self.num_tgt_tokens, self.src_slots, self.tgt_slots],
            name=f"log.{update}")
        loss, nll, src, tgt, src_slots, tgt_slots = (float(v) for v in totals)
        seconds = max(time.time() - self.start, 1e-9)
        pad = padding_efficiency(src, tgt, src_slots, tgt_slots)
        return {"loss": loss / max(tgt, 1.0), "ppl": float(np.exp(min(nll / max(tgt, 1.0), 50.0))),
                "tokens_per_s": (src + tgt) / seconds, "padding_efficiency": pad.combined,
                "padding_efficiency_src": pad.src, "padding_efficiency_tgt": pad.tgt,
                "peak_rss_gb": max(distributed.allgather_object(peak_rss_gb(), name=f"rss.{update}"))}
