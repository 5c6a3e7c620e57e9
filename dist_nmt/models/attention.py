"""Attention blocks: multi-head scaled dot-product attention softmax(Q Kᵀ / √d_k) V (Transformer), masked by
valid lengths, and the single-head additive / multiplicative attention of the GNMT decoder (end of the file).

Shapes: B batch, N = rows of one decode step (B*K under beam search), T query length, S key length,
L cached self-attention length, D model dim, H heads, d_k = D / H.

Masks are never materialised: every softmax gets per-row valid lengths (`lengths`, int32, one per query row)
and ignores keys at positions >= length. Padding masks use the source valid length; the decoder's causal
mask uses length t+1 for query position t. Lengths are clipped to >= 1 so dummy rows stay finite.

Two code paths share the same parameters:
- `hybrid_forward` attends whole sequences (training, teacher forcing) with one of `ATTENTION_IMPLS`:
  `batch_dot` (heads split by reshape/transpose, batch_dot, masked softmax, Dropout, batch_dot), `fused` (the same
  core as one dist_nmt.ops C++ op) or `interleaved` (MXNet's `_contrib_interleaved_matmul_*` ops, the cuBLAS
  strided-batched path of GluonNLP's BERT: time-major inputs (T, B, D), no head split/merge transposes, built-in
  masked softmax and Dropout between the two products).
- `step` attends one query per row against cached keys/values (incremental decoding). The self-attention
  cache keeps the newest key first and one always-masked dummy slot last, so the valid prefix is exactly
  the first t+1 slots and a length mask suffices (key order does not matter to attention).

The interleaved ops want the packed projection rows ordered (H, parts, d_k); the parameters stay ordered
(parts, H, d_k) as on the other paths, and the graph permutes the (parts*D, D) weight (a copy of the weight, not of
the activations) before the projection, so every path reads and writes the same checkpoints.
"""
from __future__ import annotations

import math

import mxnet as mx
from mxnet import init
from mxnet.gluon import HybridBlock, nn

from dist_nmt.models import ATTENTION_IMPLS
from dist_nmt.models import fused as fused_ops


def split_heads(F, x, num_heads: int, num_parts: int, d_k: int):
    """(B, T, num_parts*D) -> num_parts arrays of (B*H, T, d_k).

    Only 4-D transposes: MXNet's 5-D transpose measured ~4x slower than this reshape/transpose/split chain.
    """
    x = F.reshape(x, shape=(0, 0, -4, num_parts * num_heads, -1))  # (B, T, P*H, d_k)
    x = F.transpose(x, axes=(0, 2, 1, 3))  # (B, P*H, T, d_k)
    if num_parts == 1:
        return [F.reshape(x, shape=(-3, 0, 0))]  # (B*H, T, d_k)
    x = F.reshape(x, shape=(0, -4, num_parts, -1, -3))  # (B, P, H, T*d_k)
    parts = F.split(x, num_outputs=num_parts, axis=1, squeeze_axis=True)  # P x (B, H, T*d_k)
    return [F.reshape(part, shape=(-3, -1, d_k)) for part in parts]  # P x (B*H, T, d_k)


def merge_heads(F, x, num_heads: int):
    """(B*H, T, d_k) -> (B, T, D)."""
    x = F.reshape(x, shape=(-4, -1, num_heads, 0, 0))  # (B, H, T, d_k)
    x = F.transpose(x, axes=(0, 2, 1, 3))  # (B, T, H, d_k)
    return F.reshape(x, shape=(0, 0, -3))  # (B, T, D)


def head_lengths(F, lengths, num_heads: int):
    """Per-query valid key lengths (B, T) float -> (B*H, T) int32, clipped to >= 1 (dummy rows stay finite)."""
    lengths = F.broadcast_axis(F.expand_dims(lengths, axis=1), axis=1, size=num_heads)  # (B, H, T)
    lengths = F.clip(F.reshape(lengths, shape=(-3, 0)), 1, 1e9)  # (B*H, T)
    return F.cast(lengths, dtype="int32")


def check_impl(impl: str) -> str:
    """`impl` when it names an attention implementation, else ValueError listing them."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation '{impl}'; choose one of: {', '.join(ATTENTION_IMPLS)}")
    return impl


def attend(F, q, k, v, lengths, dropout: float, d_k: int, fused: bool = False):
    """Scaled dot-product attention over whole sequences.

    q (B*H, T, d_k), k and v (B*H, S, d_k), lengths (B*H, T) int32 -> context (B*H, T, d_k).
    The 1/√d_k scale is folded into the softmax temperature (no extra pass over the scores).
    `fused`: one custom op per call (dist_nmt.models.fused.attention) instead of batch_dot + softmax + Dropout.
    """
    if fused:
        return fused_ops.attention(F, q, k, v, lengths, dropout, d_k)
    scores = F.batch_dot(q, k, transpose_b=True)  # (B*H, T, S)
    probs = F.softmax(scores, length=lengths, use_length=True, axis=-1, temperature=math.sqrt(d_k))
    if dropout:
        probs = F.Dropout(probs, p=dropout, cudnn_off=True)  # cuDNN dropout ignores mx.random.seed
    return F.batch_dot(probs, v)  # (B*H, T, d_k)


def attend_step(F, q, k, v, lengths, d_k: int):
    """One query per row against cached keys, heads flattened into the batch.

    q (N*H, 1, d_k), k and v (N*H, L, d_k), lengths (N*H, 1) int32 -> context (N*H, d_k, 1), probs (N*H, 1, L).
    The key matrix is the left operand (a batched matrix-vector product), measured faster than q·Kᵀ here.
    """
    scores = F.reshape(F.batch_dot(k, q, transpose_b=True), shape=(0, 1, -1))  # (N*H, 1, L)
    probs = F.softmax(scores, length=lengths, use_length=True, axis=-1, temperature=math.sqrt(d_k))
    ctx = F.batch_dot(v, probs, transpose_a=True, transpose_b=True)  # (N*H, d_k, 1)
    return ctx, probs


def attend_interleaved(F, scores, lengths, dropout: float):
    """Masked softmax + Dropout between the interleaved products: scores (B*H, T, S), already scaled by 1/√d_k
    inside the qk op, lengths (B*H, T) int32 -> probabilities (B*H, T, S)."""
    probs = F.softmax(scores, length=lengths, use_length=True, axis=-1)
    return F.Dropout(probs, p=dropout, cudnn_off=True) if dropout else probs


def param_value(F, param, like):
    """A Parameter as a graph value inside a parent block's graph (a symbol, or the array on `like`'s context)."""
    return param.var() if F is mx.sym else param.data(like.context)


def interleaved_projection(F, dense_block: nn.Dense, x, parts: int, num_heads: int):
    """`dense_block(x)` with output features reordered from (parts, H, d_k) to (H, parts, d_k), the layout of the
    interleaved ops, by permuting the weight rows and bias: x (T, B, D) -> (T, B, parts*D)."""
    def interleave(w):  # (parts*H*d_k, ...) rows (parts, H, d_k) -> (H, parts, d_k)
        return F.reshape_like(F.transpose(F.reshape(w, shape=(parts, num_heads, -1)), axes=(1, 0, 2)), w)

    weight = interleave(param_value(F, dense_block.weight, x))
    bias = interleave(param_value(F, dense_block.bias, x))
    return F.FullyConnected(x, weight, bias, num_hidden=dense_block.weight.shape[0], flatten=False)


def dense(units: int, in_units: int, prefix: str, use_bias: bool = True, activation: str | None = None) -> nn.Dense:
    """FullyConnected on the last axis (oneDNN), Glorot-uniform weights, shapes known up front (no deferred init).

    `activation="relu"` runs as the Activation op (oneDNN eltwise), measured ~3x faster in backward than F.relu.
    """
    return nn.Dense(units, in_units=in_units, flatten=False, use_bias=use_bias, prefix=prefix, activation=activation,
                    weight_initializer=init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3))


class SelfAttention(HybridBlock):
    """Multi-head self-attention with one fused Q/K/V projection (one large GEMM instead of three).

    Glorot init on the fused (3D, D) weight gives each part the 1/√2 gain fairseq applies to Q, K and V.
    `impl` is one of ATTENTION_IMPLS; `interleaved` takes and returns time-major (T, B, D).
    """

    def __init__(self, d_model: int, num_heads: int, attention_dropout: float, prefix: str | None = None,
                 impl: str = "batch_dot"):
        super().__init__(prefix=prefix)
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.attention_dropout, self.impl = attention_dropout, check_impl(impl)
        with self.name_scope():
            self.qkv = dense(3 * d_model, d_model, "qkv_")
            self.out = dense(d_model, d_model, "out_")

    def hybrid_forward(self, F, x, lengths):
        """x (B, T, D) ((T, B, D) when interleaved), lengths (B*H, T) int32 -> same layout as x."""
        if self.impl == "interleaved":
            qkv = interleaved_projection(F, self.qkv, x, 3, self.num_heads)  # (T, B, 3D), (H, 3, d_k) order
            scores = F.contrib.interleaved_matmul_selfatt_qk(qkv, heads=self.num_heads)  # (B*H, T, T)
            probs = attend_interleaved(F, scores, lengths, self.attention_dropout)
            ctx = F.contrib.interleaved_matmul_selfatt_valatt(qkv, probs, heads=self.num_heads)  # (T, B, D)
            return self.out(ctx)
        q, k, v = split_heads(F, self.qkv(x), self.num_heads, 3, self.d_k)  # 3 x (B*H, T, d_k)
        ctx = attend(F, q, k, v, lengths, self.attention_dropout, self.d_k, self.impl == "fused")
        return self.out(merge_heads(F, ctx, self.num_heads))

    def step(self, F, x, k_cache, v_cache, lengths):
        """x (N, D), caches (N*H, t+1, d_k) newest first, lengths (N*H, 1) -> out (N, D), caches (N*H, t+2, d_k).

        Caches arrive with heads already merged into the batch axis (a free view made outside the graph):
        reshaping a graph input inside the graph would copy the whole cache every step.
        """
        qkv = F.reshape(self.qkv(x), shape=(0, 3, self.num_heads, -1))  # (N, 3, H, d_k)
        q, k, v = (F.reshape(part, shape=(-3, 1, -1))  # (N*H, 1, d_k)
                   for part in F.split(qkv, num_outputs=3, axis=1, squeeze_axis=True))
        k_cache = F.concat(k, k_cache, dim=1)  # (N*H, t+2, d_k)
        v_cache = F.concat(v, v_cache, dim=1)  # (N*H, t+2, d_k)
        ctx, _ = attend_step(F, q, k_cache, v_cache, lengths, self.d_k)
        return self.out(F.reshape(ctx, shape=(-1, self.d_model))), k_cache, v_cache  # (N, D)


class CrossAttention(HybridBlock):
    """Multi-head encoder-decoder attention; keys and values come from one fused K/V projection.

    `impl` is one of ATTENTION_IMPLS; `interleaved` takes x, mem and returns time-major ((T, B, D), (S, B, D)).
    """

    def __init__(self, d_model: int, num_heads: int, attention_dropout: float, prefix: str | None = None,
                 impl: str = "batch_dot"):
        super().__init__(prefix=prefix)
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.attention_dropout, self.impl = attention_dropout, check_impl(impl)
        with self.name_scope():
            self.q = dense(d_model, d_model, "q_")
            self.kv = dense(2 * d_model, d_model, "kv_")
            self.out = dense(d_model, d_model, "out_")

    def hybrid_forward(self, F, x, mem, lengths):
        """x (B, T, D), mem (B, S, D) (time-major when interleaved), lengths (B*H, T) int32 -> x's layout."""
        if self.impl == "interleaved":
            q = self.q(x)  # (T, B, D)
            kv = interleaved_projection(F, self.kv, mem, 2, self.num_heads)  # (S, B, 2D), (H, 2, d_k) order
            scores = F.contrib.interleaved_matmul_encdec_qk(q, kv, heads=self.num_heads)  # (B*H, T, S)
            probs = attend_interleaved(F, scores, lengths, self.attention_dropout)
            return self.out(F.contrib.interleaved_matmul_encdec_valatt(kv, probs, heads=self.num_heads))
        (q,) = split_heads(F, self.q(x), self.num_heads, 1, self.d_k)  # (B*H, T, d_k)
        k, v = split_heads(F, self.kv(mem), self.num_heads, 2, self.d_k)  # 2 x (B*H, S, d_k)
        ctx = attend(F, q, k, v, lengths, self.attention_dropout, self.d_k, self.impl == "fused")
        return self.out(merge_heads(F, ctx, self.num_heads))

    def project_memory(self, F, mem):
        """mem (B, S, D) -> keys, values (B, H, S, d_k): computed once per source, reused every step."""
        kv = F.reshape(self.kv(mem), shape=(0, 0, -4, 2 * self.num_heads, -1))  # (B, S, 2H, d_k)
        kv = F.transpose(kv, axes=(0, 2, 1, 3))  # (B, 2H, S, d_k)
        kv = F.reshape(kv, shape=(0, -4, 2, -1, -2))  # (B, 2, H, S, d_k)
        k, v = F.split(kv, num_outputs=2, axis=1, squeeze_axis=True)  # 2 x (B, H, S, d_k)
        return k, v

    def step(self, F, x, mem_k, mem_v, lengths):
        """x (N, D), mem_k/mem_v (N*H, S, d_k), lengths (N*H, 1) -> out (N, D), probs (N, H, S)."""
        q = F.reshape(self.q(x), shape=(-1, 1, self.d_k))  # (N*H, 1, d_k)
        ctx, probs = attend_step(F, q, mem_k, mem_v, lengths, self.d_k)
        out = self.out(F.reshape(ctx, shape=(-1, self.d_model)))  # (N, D)
        probs = F.reshape(F.reshape(probs, shape=(0, -1)), shape=(-4, -1, self.num_heads, 0))  # (N, H, S)
        return out, probs


# Single-head attention of the GNMT decoder. Shapes: B batch, T queries, S keys, H query/value size,
# A attention units (= H). Both forms take per-query source lengths (B, T) and return context (B, T, H) and
# probabilities (B, T, S), exactly 0 on padding and summing to 1 over valid keys.

def _attend_values(F, scores, values, lengths):
    """Length-masked softmax over scores (B, T, S), then probs x values (B, S, H) -> ctx (B, T, H), probs."""
    lengths = F.cast(F.clip(lengths, 1, 1e9), dtype="int32")  # dummy rows (length 0) stay finite
    probs = F.softmax(scores, length=lengths, use_length=True, axis=-1)
    # linalg.gemm2, not batch_dot: batch_dot measured erratic (2-1000 ms) on CPU where gemm2 took 1-4 ms.
    return F.linalg.gemm2(probs, values), probs  # (B, T, H), (B, T, S)


class MLPAttention(HybridBlock):
    """Additive attention score wᵀ tanh(W_q q + b + k), k = W_k m precomputed once per source
    (`GNMTModel.key_proj`, so decoding never re-projects the memory).

    `normalized` uses w = g·v/|v| with g initialised to 1/√A (GNMT's normalised Bahdanau attention).
    `chunk_units` > 0 computes the score as a sum over slices of that many attention units, so the (B, T, S, a)
    temporaries of the forward and backward pass are a = chunk_units wide instead of A: the number of slices is
    fixed by A (static under hybridize, unlike T, which the symbolic graph does not know). Backward still keeps
    every slice's tanh input and output, so the saving is partial: forward + backward of one block at
    B = T = S = 32, A = 512 (a 64 MB (B, T, S, A) tensor) grew peak RSS by 300 MB unchunked, 296 MB at 128 units,
    211 MB at 64, against 38 MB for `LuongAttention` (MXNET_MEMORY_OPT / MXNET_BACKWARD_DO_MIRROR changed
    nothing).

    `fused` (the fused CPU ops loaded): the score is one `dn_additive_score` op (`models.fused.additive_score`)
    that keeps nothing (B, T, S, A) and recomputes tanh in backward; `chunk_units` is then unused. The parameters,
    the query projection, the weight normalisation and the masked softmax stay built-in ops on both paths.
    """

    def __init__(self, units: int, normalized: bool, chunk_units: int = 0, prefix: str | None = None,
                 fused: bool = False):
        super().__init__(prefix=prefix)
        self.units, self.normalized, self.fused = units, normalized, fused
        self.chunk_units = chunk_units if 0 < chunk_units < units else units
        with self.name_scope():
            self.query_proj = nn.Dense(units, flatten=False, in_units=units, prefix="query_")
            self.v = self.params.get("v", shape=(1, units), init=init.Xavier(rnd_type="uniform", magnitude=3))
            if normalized:
                self.g = self.params.get("g", shape=(1,), init=init.Constant(1.0 / math.sqrt(units)))

    def hybrid_forward(self, F, query, keys, values, lengths, v, g=None):
        """query (B, T, H), keys (B, S, A), values (B, S, H), lengths (B, T) -> ctx (B, T, H), probs (B, T, S)."""
        q = self.query_proj(query)  # (B, T, A)
        if self.normalized:
            v = F.broadcast_mul(v, F.reshape(g / F.sqrt(F.sum(F.square(v))), shape=(1, 1)))
        if self.fused:  # the reshape is the built-in op that adds dv into the Parameter's gradient
            scores = fused_ops.additive_score(F, q, keys, F.reshape(v, shape=(-1,)))  # (B, T, S)
            return _attend_values(F, scores, values, lengths)
        scores = None
        for begin in range(0, self.units, self.chunk_units):
            end = min(begin + self.chunk_units, self.units)
            part = self._score(F, *(F.slice_axis(x, axis=-1, begin=begin, end=end) for x in (q, keys, v))) \
                if end - begin < self.units else self._score(F, q, keys, v)
            scores = part if scores is None else scores + part
        return _attend_values(F, F.reshape(scores, shape=(0, 0, -1)), values, lengths)  # scores (B, T, S)

    @staticmethod
    def _score(F, q, keys, v):
        """q (B, T, a), keys (B, S, a), v (1, a) -> vᵀ tanh(q + k) as (B, T, S, 1)."""
        hidden = F.broadcast_add(F.expand_dims(q, axis=2), F.expand_dims(keys, axis=1))  # (B, T, S, a)
        hidden = F.Activation(hidden, act_type="tanh")  # oneDNN eltwise: ~10x faster than F.tanh on CPU
        return F.FullyConnected(hidden, weight=v, no_bias=True, num_hidden=1, flatten=False)  # (B, T, S, 1)


class LuongAttention(HybridBlock):
    """General multiplicative attention (Luong et al., 2015): score (W q)ᵀ m with the memory itself as keys (so
    A = H) and no bias. Two matrix products, no 4-D tensor. `scaled` divides the score by √A (GluonNLP's
    `scaled_luong`); unscaled (`luong`) is the paper's "general" score."""

    def __init__(self, units: int, scaled: bool = True, prefix: str | None = None):
        super().__init__(prefix=prefix)
        self.units, self.scale = units, 1.0 / math.sqrt(units) if scaled else 1.0
        with self.name_scope():
            self.query_proj = nn.Dense(units, flatten=False, in_units=units, use_bias=False, prefix="query_")

    def hybrid_forward(self, F, query, keys, values, lengths):
        """query (B, T, H), keys (B, S, H), values (B, S, H), lengths (B, T) -> ctx (B, T, H), probs (B, T, S)."""
        q = self.query_proj(query)  # (B, T, A)
        scores = F.linalg.gemm2(q, keys, transpose_b=True, alpha=self.scale)  # (B, T, S)
        return _attend_values(F, scores, values, lengths)


ADDITIVE_ATTENTION = ("mlp", "normed_mlp")
GNMT_ATTENTION = ADDITIVE_ATTENTION + ("luong", "scaled_luong")


def gnmt_attention(kind: str, units: int, chunk_units: int = 0, prefix: str | None = None,
                   fused: bool = False) -> HybridBlock:
    """The GNMT decoder's attention block by name: mlp, normed_mlp (additive), luong or scaled_luong.

    `fused`: additive scores through the fused CPU op (the multiplicative kinds have no 4-D tensor and ignore it).
    """
    if kind in ("luong", "scaled_luong"):
        return LuongAttention(units, scaled=kind == "scaled_luong", prefix=prefix)
    if kind in ADDITIVE_ATTENTION:
        return MLPAttention(units, kind == "normed_mlp", chunk_units, prefix=prefix, fused=fused)
    raise ValueError(f"unknown attention '{kind}'; choose one of: {', '.join(GNMT_ATTENTION)}")
