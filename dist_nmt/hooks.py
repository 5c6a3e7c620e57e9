"""Fault-injection and inspection hooks for tests, read from the environment in this one place.

    DIST_NMT_INJECT_NAN="5,7@1"    update 5 (every rank) and update 7 (rank 1 only) get non-finite gradients
    DIST_NMT_DUMP_PARAMS=DIR       at the end of training every rank writes DIR/rank<r>.params
    DIST_NMT_CPU_PER_RANK=1        rank r trains on mx.cpu(r): a CPU stand-in for one GPU per rank (device ids != 0)

They exist so the integration tests can drive the real trainer through overflow skips and compare ranks' parameters;
unset (the default) they do nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _parse_nan(spec: str, world_size: int) -> frozenset[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        update, _, rank = item.partition("@")
        ranks = [int(rank)] if rank else range(world_size)
        out.update((int(update), r) for r in ranks)
    return frozenset(out)


@dataclass(frozen=True)
class FaultHooks:
    """The hooks active in this process."""

    nan_at: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (update, rank)
    dump_params_dir: str = ""

    @classmethod
    def from_env(cls, world_size: int) -> FaultHooks:
        """Read DIST_NMT_INJECT_NAN and DIST_NMT_DUMP_PARAMS."""
        return cls(_parse_nan(os.environ.get("DIST_NMT_INJECT_NAN", ""), world_size),
                   os.environ.get("DIST_NMT_DUMP_PARAMS", ""))

    def loss_scale_factor(self, update: int, rank: int) -> float:
        """NaN for an injected update (every gradient becomes non-finite), else 1."""
        return float("nan") if (update, rank) in self.nan_at else 1.0

    def dump_params(self, model: Any, rank: int) -> None:
        """Write this rank's parameters to dump_params_dir/rank<r>.params (when set)."""
        if self.dump_params_dir:
            Path(self.dump_params_dir).mkdir(parents=True, exist_ok=True)
            model.save_parameters(str(Path(self.dump_params_dir) / f"rank{rank}.params"), deduplicate=True)


def test_device(rank: int) -> Any:
    """`mx.cpu(rank)` when DIST_NMT_CPU_PER_RANK is set, else None (use `distributed.device`).

    MXNet keys per-device optimizer state by device id, on CPU as on GPU, so this reproduces the device-id logic of
    one GPU per rank on a CPU-only machine.
    """
    if not os.environ.get("DIST_NMT_CPU_PER_RANK"):
        return None
    import mxnet as mx

    return mx.cpu(rank)
