"""One training step — forward, backward, all-reduce, unscale/clip, update — used by the trainer, the dev loss and
the benchmarks alike, so a benchmark measures exactly what training runs.

    stats = train_step(model, trainer, batches, ctx, loss_scale=1.0, optim=cfg.optim, num_tgt_global=n)

The loss is a token *sum*. Gradients are summed over micro-batches (`grad_req='add'`) and over ranks (the Horovod
seam, `distributed.reduced_grads`), then divided exactly once by the all-reduced target-token count times the loss
scale (and the clip factor) in the optimizer's rescale: mean-per-token gradients, unscaled and clipped, on every rank
alike. Reduced gradients are bit-identical on every rank, so the skip decision (a non-finite norm) is too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mxnet as mx

from dist_nmt import distributed
from dist_nmt.config import OptimConfig
from dist_nmt.data import Batch
from dist_nmt.loss import fused_label_smoothed_nll, label_smoothed_nll


@dataclass(frozen=True)
class ModelInputs:
    """One batch as NDArrays on the device: ids int32, valid lengths float32."""

    src: mx.nd.NDArray  # (B, S)
    src_valid_len: mx.nd.NDArray  # (B,)
    tgt_in: mx.nd.NDArray  # (B, T)
    tgt_out: mx.nd.NDArray  # (B, T)
    tgt_valid_len: mx.nd.NDArray  # (B,)


@dataclass(frozen=True)
class StepStats:
    """What one update did (sums over this rank's micro-batches)."""

    loss_sum: float
    nll_sum: float
    grad_norm: float
    skipped: bool


def to_nd(batch: Batch, ctx: mx.Context) -> ModelInputs:
    """numpy arrays of a collated batch -> NDArrays on `ctx` (ids stay int32)."""
    def put(a):
        return mx.nd.array(a, ctx=ctx, dtype=a.dtype)

    return ModelInputs(put(batch.src), put(batch.src_valid_len), put(batch.tgt_in), put(batch.tgt_out),
                       put(batch.tgt_valid_len))


def forward_loss(model: mx.gluon.Block, x: ModelInputs, label_smoothing: float,
                 fused: bool = False) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """(label-smoothed loss sum, NLL sum) over the real target tokens of one batch.

    `fused` (the fused ops library is loaded: `dist_nmt.ops.resolve` said so) computes it with the fused
    `dn_smoothed_nll` op, which keeps no (B, T, V) tensor besides the logits; same values and gradients.
    """
    logits = model(x.src, x.src_valid_len, x.tgt_in, x.tgt_valid_len)  # (B, T, V)
    loss_fn = fused_label_smoothed_nll if fused else label_smoothed_nll
    return loss_fn(logits, x.tgt_out, x.tgt_valid_len, label_smoothing)


def seed_for(seed: int, update: int, rank: int) -> int:
    """RNG seed of one update on one rank: dropout masks are a pure function of (seed, update, rank), so a resumed
    run draws exactly the masks the uninterrupted one did."""
    return (seed * 1_000_003 + update * 7_919 + rank) % (2**31 - 1)


def train_step(model: mx.gluon.Block, trainer, batches: Sequence[Batch], ctx: mx.Context, loss_scale: float,
               optim: OptimConfig, num_tgt_global: float, fused_loss: bool = False) -> StepStats:
    """Forward/backward every micro-batch, all-reduce, clip on the true gradient norm, update (or skip).

    `num_tgt_global` is the target-token count of this update summed over all ranks and micro-batches;
    `fused_loss`: the loss through the fused op (see `forward_loss`).
    """
    sums = []  # (loss, nll) per micro-batch, read once at the end: no device sync between micro-batches
    for batch in batches:
        x = to_nd(batch, ctx)
        with mx.autograd.record():
            loss, nll = forward_loss(model, x, optim.label_smoothing, fused_loss)
            scaled = loss * loss_scale
        scaled.backward()
        sums.append(mx.nd.stack(loss.reshape((1,)), nll.reshape((1,)), axis=1))
    loss_sum, nll_sum = (float(v) for v in mx.nd.add_n(*sums).asnumpy().reshape(-1))
    grads = distributed.reduced_grads(trainer)
    sum_sq = mx.nd.multi_sum_sq(*grads, num_arrays=len(grads)).sum().asscalar()
    grad_norm = float(sum_sq) ** 0.5 / (num_tgt_global * loss_scale)
    finite = bool(abs(grad_norm) < float("inf"))
    if finite:
        clip = max(1.0, grad_norm / optim.clip_norm) if optim.clip_norm > 0 else 1.0
        distributed.apply_update(trainer, num_tgt_global * loss_scale * clip)
    distributed.zero_grads(grads)
    return StepStats(loss_sum, nll_sum, grad_norm, not finite)
