"""Graph helpers for the fused CPU ops (`F.dn_*`, registered by `dist_nmt.ops.load()`; contracts in fused_ops.cc).

Shapes: N rows, D model dim, BH = batch*heads, B batch, T queries, S keys, d_k head dim, A attention units.

Models only call these when built with `fused_ops=True`, which the trainer passes after the library loaded
(`dist_nmt.ops.resolve`). Inputs go through `amp_cast` to float32 (a no-op in fp32): under bf16 AMP the projections
feeding these ops run in bf16, while LayerNorm statistics, softmax and dropout stay fp32.
"""
from __future__ import annotations

import math

# Two 24-bit halves: float32 holds integers exactly up to 2**24.
_SEED_HALF = float(2 ** 24)


def dropout_ctrl(F, p: float):
    """The fused ops' `ctrl` input (3,): [seed_hi, seed_lo, training].

    The seed is drawn from mx.random inside the graph, so each forward gets fresh masks that follow the
    process's mx.random seed (as built-in Dropout does). The training flag comes from built-in Dropout, the only
    op that knows the mode inside a cached graph: Dropout(1, p=0.5) is exactly 1 at inference and 0 or 2 in
    training. With p == 0 nothing is drawn, so the RNG stream is the one the unfused path sees.
    """
    if not p:
        return F.zeros(shape=(3,))
    seed = F.floor(F.random.uniform(low=0, high=_SEED_HALF, shape=(2,)))
    training = F.Dropout(F.ones(shape=(1,)), p=0.5) != 1
    return F.concat(seed, training, dim=0)


def fp32(F, x):
    """x as float32 without a copy when it already is (AMP may hand these ops bf16 activations).

    Only for outputs of other ops: on a leaf with grad_req 'add', MXNet 1.9.1's float32->float32 amp_cast passes
    back a zero gradient (measured), so the fused ops never take a Parameter or a graph input directly.
    """
    return F.amp_cast(x, dtype="float32")


def add_dropout_norm(F, x, h, p: float, eps: float):
    """Post-norm core: (x + dropout(h) - mean) / std per row -> (xhat, rstd (..., 1)); x, h (..., D)."""
    xhat, rstd = F.dn_add_dropout_norm(fp32(F, x), fp32(F, h), dropout_ctrl(F, p), p=p, eps=eps)
    return xhat, rstd


def norm(F, x, eps: float):
    """(x - mean) / std per row -> (xhat, rstd (..., 1)); x (..., D)."""
    xhat, rstd = F.dn_norm(fp32(F, x), eps=eps)
    return xhat, rstd


def add_dropout(F, x, h, p: float):
    """Pre-norm residual: x + dropout(h), one pass, mask regenerated in backward."""
    if not p:
        return x + h
    return F.dn_add_dropout(fp32(F, x), fp32(F, h), dropout_ctrl(F, p), p=p)


def attention(F, q, k, v, lengths, p: float, d_k: int):
    """dropout(softmax(q kᵀ / √d_k, masked by lengths)) v per (batch*head), OpenMP over BH.

    q (BH, T, d_k), k and v (BH, S, d_k), lengths (BH, T) per-query valid key counts (int32 or float)
    -> context (BH, T, d_k). The probabilities are kept for backward; the dropout mask is regenerated.
    """
    ctx, _ = F.dn_attention(fp32(F, q), fp32(F, k), fp32(F, v), F.cast(lengths, dtype="float32"),
                            dropout_ctrl(F, p), p=p, scale=1.0 / math.sqrt(d_k))
    return ctx


def additive_score(F, q, k, v):
    """vᵀ tanh(q_t + k_s) for every query/key pair without the (B, T, S, A) hidden tensor; tanh is recomputed in
    backward. q (B, T, A), k (B, S, A), v (A,) -> scores (B, T, S), unmasked (the softmax masks them).

    `v` must come out of a built-in op (a reshape of the Parameter, or the weight-normalised vector): the op's
    backward writes dv, and MXNet must be the one adding it into the Parameter's gradient (grad_req 'add').
    """
    return F.dn_additive_score(fp32(F, q), fp32(F, k), fp32(F, v))
