"""Transformer encoder-decoder (Vaswani et al., 2017) with one shared vocabulary and incremental decoding.

Shapes: B batch, S source length, T target length, D model dim, H heads, d_k = D / H, V vocab,
N rows of one decode step (B*K under beam search), F feed-forward dim.

    model = TransformerModel(TransformerHParams(num_enc_layers=2, num_dec_layers=2, d_model=64, d_ff=128,
                                                num_heads=4), vocab_size=100)
    model.initialize()
    model.hybridize(static_alloc=True)
    logits = model(src, src_valid_len, tgt_in, tgt_valid_len)        # (B, T, V)
    states = model.init_decode_states(model.encode(src, src_valid_len))
    log_probs, states, attn = model.decode_step(bos_tokens, states)  # (B, V), [...], (B, S)

Post-norm (default, the paper's layout) or pre-norm (`pre_norm`, with a final LayerNorm on each stack).
Positions are sinusoidal and computed on the fly, so no length table is stored and nothing bounds the length.
Source and target embeddings are one matrix, scaled by √D on lookup, and the output projection reuses it when
`tie_embeddings` (no output bias either way).

`fused_ops=True` (the library loaded by `dist_nmt.ops`) runs residual-add + dropout + LayerNorm as fused CPU ops
during training and teacher-forced forward; `attention_impl` picks the attention there (`batch_dot`, `fused`: the
fused C++ core, `interleaved`: MXNet's interleaved matmul ops, for which both stacks run time-major (S, B, D) /
(T, B, D) between one transpose after the embedding and one before the output projection). Parameters, their
names and shapes are the same on every path, so checkpoints move freely between them. Incremental decoding
always uses built-in batch-major ops.
"""
from __future__ import annotations

import math
import warnings
from functools import partial

import mxnet as mx
from mxnet import init
from mxnet.gluon import HybridBlock, nn

from dist_nmt.models import fused as fused_ops
from dist_nmt.models.attention import CrossAttention, SelfAttention, check_impl, dense, head_lengths
from dist_nmt.models.exact import fully_connected
from dist_nmt.models.hparams import TransformerHParams


def positional_encoding(F, positions, d_model: int):
    """Sinusoidal position vectors [sin(p·ω) | cos(p·ω)], ω_i = 10000^(-2i/D): positions (P,) -> (P, D)."""
    inv_freq = F.exp(F.arange(0, d_model // 2) * (-2.0 * math.log(10000.0) / d_model))  # (D/2,)
    angles = F.broadcast_mul(F.reshape(positions, shape=(-1, 1)), F.reshape(inv_freq, shape=(1, -1)))
    return F.concat(F.sin(angles), F.cos(angles), dim=1)  # (P, D)


def residual(F, x, norm, fn, pre_norm: bool, dropout: float, fused: bool = False):
    """x + dropout(fn(x)) with LayerNorm after (post-norm) or on fn's input (pre-norm).

    `fn` returns a tuple (out, *extras); returns (new x, extras). `fused` (norm is a LayerNorm block): the add,
    dropout and normalisation run as one op (post-norm) or add + dropout as one op (pre-norm).
    """
    if fused:
        if pre_norm:
            out = fn(norm.fused(F, x))
            return fused_ops.add_dropout(F, x, out[0], dropout), out[1:]
        out = fn(x)
        return norm.fused(F, x, out[0], dropout), out[1:]
    out = fn(norm(x) if pre_norm else x)
    h = F.Dropout(out[0], p=dropout, cudnn_off=True) if dropout else out[0]
    x = x + h
    return (x if pre_norm else norm(x)), out[1:]


class FeedForward(HybridBlock):
    """relu(x W1 + b1) W2 + b2 with optional dropout on the hidden activation."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float, prefix: str | None = None):
        super().__init__(prefix=prefix)
        self.activation_dropout = activation_dropout
        with self.name_scope():
            self.fc1 = dense(d_ff, d_model, "fc1_", activation="relu")
            self.fc2 = dense(d_model, d_ff, "fc2_")

    def hybrid_forward(self, F, x):
        """x (..., D) -> (..., D)."""
        h = self.fc1(x)  # (..., F)
        if self.activation_dropout:
            h = F.Dropout(h, p=self.activation_dropout, cudnn_off=True)
        return self.fc2(h)


class LayerNorm(HybridBlock):
    """Layer normalisation over the last axis, gamma * (x - mean) / sqrt(var + eps) + beta.

    Every per-row reduction and broadcast is a FullyConnected with a constant ones matrix, so forward and
    backward run as oneDNN GEMMs plus same-shape elementwise ops. MXNet 1.9's own LayerNorm backward uses a slow
    generic reduction on CPU: this formulation measured ~2.4x faster forward+backward at (3200, 512).
    The GEMMs (here and in `fused`) go through `exact.fully_connected`, so under bf16 / fp16 AMP the statistics and
    the gamma/beta products stay float32, as MXNet's own LayerNorm does. Parameters are named `gamma`/`beta` like
    gluon.nn.LayerNorm.
    """

    def __init__(self, units: int, epsilon: float = 1e-5, prefix: str | None = None,
                 builtin: bool | None = None):
        super().__init__(prefix=prefix)
        self.units, self.epsilon = units, epsilon
        # On GPU, MXNet's own LayerNorm op (fp32 under AMP; the GEMMs here would run in fp16). Same parameters.
        self.builtin = mx.context.num_gpus() > 0 if builtin is None else builtin
        self.gamma = self.params.get("gamma", shape=(units,), init="ones")
        self.beta = self.params.get("beta", shape=(units,), init="zeros")

    def _gamma_beta(self, F, x):
        """The parameters as graph values, so another block's graph can use them (symbols or arrays)."""
        if F is mx.sym:
            return self.gamma.var(), self.beta.var()
        return self.gamma.data(x.context), self.beta.data(x.context)

    def inference(self, F, x):
        """Same function through MXNet's fused LayerNorm: fewer ops for the small per-step decoder inputs, where
        no backward is needed. Usable inside another block's graph (reads the parameters as symbols there)."""
        gamma, beta = self._gamma_beta(F, x)
        return F.LayerNorm(x, gamma, beta, axis=-1, eps=self.epsilon)

    def fused(self, F, x, h=None, dropout: float = 0.0):
        """LN(x + dropout(h)) (or LN(x) without h) with the fused CPU ops; usable inside another block's graph.

        The custom op returns the normalised rows; gamma and beta are applied here by built-in GEMMs because a
        custom op's backward overwrites gradients, and parameters accumulate them (grad_req='add').
        """
        if h is None:
            xhat, rstd = fused_ops.norm(F, x, self.epsilon)  # (..., D), (..., 1)
        else:
            xhat, rstd = fused_ops.add_dropout_norm(F, x, h, dropout, self.epsilon)
        gamma, beta = self._gamma_beta(F, x)
        ones = F.ones_like(rstd)  # (..., 1)
        # 1 ⊗ gamma and 1 ⊗ beta as outer products: their backward sums over rows inside the GEMM.
        scale = fully_connected(F, ones, F.reshape(gamma, shape=(-1, 1)), self.units)
        shift = fully_connected(F, ones, F.reshape(beta, shape=(-1, 1)), self.units)
        return xhat * scale + shift

    def hybrid_forward(self, F, x, gamma, beta):
        """x (..., D) -> (..., D)."""
        d = self.units
        if self.builtin:
            return F.LayerNorm(x, gamma, beta, axis=-1, eps=self.epsilon)
        mean_w = F.ones((1, d)) * (1.0 / d)  # row-mean as a (D -> 1) product
        spread_w = F.ones((d, 1))  # broadcast a per-row scalar as a (1 -> D) product
        mean = fully_connected(F, x, mean_w, 1)  # (..., 1)
        xc = x - fully_connected(F, mean, spread_w, d)  # (..., D)
        var = fully_connected(F, xc * xc, mean_w, 1)  # (..., 1)
        rstd = F.rsqrt(var + self.epsilon)  # (..., 1)
        # rstd ⊗ gamma and 1 ⊗ beta as outer products: their backward sums over rows inside the GEMM.
        scale = fully_connected(F, rstd, F.reshape(gamma, shape=(-1, 1)), d)
        shift = fully_connected(F, F.ones_like(rstd), F.reshape(beta, shape=(-1, 1)), d)
        return xc * scale + shift


class EncoderLayer(HybridBlock):
    """Self-attention then feed-forward, each wrapped by `residual`."""

    def __init__(self, hp: TransformerHParams, prefix: str | None = None, fused: bool = False,
                 attention_impl: str = "batch_dot"):
        super().__init__(prefix=prefix)
        self.pre_norm, self.dropout, self.fused = hp.pre_norm, hp.dropout, fused
        with self.name_scope():
            self.self_attn = SelfAttention(hp.d_model, hp.num_heads, hp.attention_dropout, prefix="selfatt_",
                                           impl=attention_impl)
            self.ffn = FeedForward(hp.d_model, hp.d_ff, hp.activation_dropout, prefix="ffn_")
            self.norm1, self.norm2 = (LayerNorm(hp.d_model, prefix=f"norm{i}_") for i in (1, 2))

    def hybrid_forward(self, F, x, lengths):
        """x (B, S, D) ((S, B, D) with interleaved attention), lengths (B*H, S) int32 -> x's layout."""
        pre, drop, fused = self.pre_norm, self.dropout, self.fused
        x, _ = residual(F, x, self.norm1, lambda h: (self.self_attn(h, lengths),), pre, drop, fused)
        x, _ = residual(F, x, self.norm2, lambda h: (self.ffn(h),), pre, drop, fused)
        return x


class DecoderLayer(HybridBlock):
    """Causal self-attention, cross-attention, feed-forward; `step` is the same layer for one position."""

    def __init__(self, hp: TransformerHParams, prefix: str | None = None, fused: bool = False,
                 attention_impl: str = "batch_dot"):
        super().__init__(prefix=prefix)
        self.pre_norm, self.dropout, self.fused = hp.pre_norm, hp.dropout, fused
        with self.name_scope():
            self.self_attn = SelfAttention(hp.d_model, hp.num_heads, hp.attention_dropout, prefix="selfatt_",
                                           impl=attention_impl)
            self.cross_attn = CrossAttention(hp.d_model, hp.num_heads, hp.attention_dropout, prefix="crossatt_",
                                             impl=attention_impl)
            self.ffn = FeedForward(hp.d_model, hp.d_ff, hp.activation_dropout, prefix="ffn_")
            self.norm1, self.norm2, self.norm3 = (LayerNorm(hp.d_model, prefix=f"norm{i}_") for i in (1, 2, 3))

    def hybrid_forward(self, F, x, self_lengths, mem, mem_lengths):
        """x (B, T, D), self_lengths (B*H, T), mem (B, S, D), mem_lengths (B*H, T) -> (B, T, D); x and mem
        time-major ((T, B, D), (S, B, D)) with interleaved attention."""
        pre, drop, fused = self.pre_norm, self.dropout, self.fused
        x, _ = residual(F, x, self.norm1, lambda h: (self.self_attn(h, self_lengths),), pre, drop, fused)
        x, _ = residual(F, x, self.norm2, lambda h: (self.cross_attn(h, mem, mem_lengths),), pre, drop, fused)
        x, _ = residual(F, x, self.norm3, lambda h: (self.ffn(h),), pre, drop, fused)
        return x

    def step(self, F, x, k_cache, v_cache, self_lengths, mem_k, mem_v, mem_lengths):
        """x (N, D), caches (N, H, t+1, d_k), mem_k/mem_v (N, H, S, d_k), lengths (N*H, 1).

        Returns x (N, D), new caches (N, H, t+2, d_k) and cross-attention probs (N, H, S).
        """
        pre = self.pre_norm  # no dropout at inference; fused LayerNorm (no backward needed)
        norm1, norm2, norm3 = (partial(n.inference, F) for n in (self.norm1, self.norm2, self.norm3))
        x, (k_cache, v_cache) = residual(
            F, x, norm1, lambda h: self.self_attn.step(F, h, k_cache, v_cache, self_lengths), pre, 0.0)
        x, (probs,) = residual(
            F, x, norm2, lambda h: self.cross_attn.step(F, h, mem_k, mem_v, mem_lengths), pre, 0.0)
        x, _ = residual(F, x, norm3, lambda h: (self.ffn(h),), pre, 0.0)
        return x, k_cache, v_cache, probs


def embed_sequence(F, embed, tokens, d_model: int, dropout: float):
    """√D-scaled shared embedding plus sinusoidal positions: tokens (B, T) -> (B, T, D), positions (T,)."""
    x = embed(tokens) * math.sqrt(d_model)  # (B, T, D)
    positions = F.contrib.arange_like(x, axis=1)  # (T,)
    x = F.broadcast_add(x, F.expand_dims(positional_encoding(F, positions, d_model), axis=0))
    return (F.Dropout(x, p=dropout, cudnn_off=True) if dropout else x), positions


def lengths_like(F, lengths, x):
    """Repeat per-row lengths (B,) along x's time axis: x (B, T, D) -> (B, T)."""
    return F.broadcast_like(F.reshape(lengths, shape=(-1, 1)), x, lhs_axes=(1,), rhs_axes=(1,))


def final_norm(F, norm: LayerNorm | None, x, fused: bool):
    """The pre-norm stacks' last LayerNorm (identity for post-norm, where `norm` is None)."""
    if norm is None:
        return x
    return norm.fused(F, x) if fused else norm(x)


class TransformerEncoder(HybridBlock):
    """Embedding + N encoder layers (+ final LayerNorm when pre-norm); time-major inside when `time_major`."""

    def __init__(self, hp: TransformerHParams, embed: nn.Embedding, prefix: str | None = None, fused: bool = False,
                 attention_impl: str = "batch_dot"):
        super().__init__(prefix=prefix)
        self.hp, self.fused, self.time_major = hp, fused, attention_impl == "interleaved"
        with self.name_scope():
            self.embed = embed
            self.layers = nn.HybridSequential(prefix="")
            for i in range(hp.num_enc_layers):
                self.layers.add(EncoderLayer(hp, prefix=f"layer{i}_", fused=fused, attention_impl=attention_impl))
            self.final_norm = LayerNorm(hp.d_model, prefix="final_norm_") if hp.pre_norm else None

    def hybrid_forward(self, F, src, src_valid_len):
        """src (B, S) token ids, src_valid_len (B,) -> encoder output (B, S, D), or (S, B, D) when time-major
        (the decoder's layout: the full forward hands it over without transposing back)."""
        hp = self.hp
        x, _ = embed_sequence(F, self.embed, src, hp.d_model, hp.dropout)  # (B, S, D)
        lengths = head_lengths(F, lengths_like(F, src_valid_len, x), hp.num_heads)  # (B*H, S)
        if self.time_major:
            x = F.transpose(x, axes=(1, 0, 2))  # (S, B, D)
        for layer in self.layers:
            x = layer(x, lengths)
        return final_norm(F, self.final_norm, x, self.fused)


class TransformerDecoder(HybridBlock):
    """Embedding + N decoder layers (+ final LayerNorm when pre-norm) + output projection, teacher forced."""

    def __init__(self, hp: TransformerHParams, embed: nn.Embedding, proj: nn.Dense, prefix: str | None = None,
                 fused: bool = False, attention_impl: str = "batch_dot"):
        super().__init__(prefix=prefix)
        self.hp, self.fused, self.time_major = hp, fused, attention_impl == "interleaved"
        with self.name_scope():
            self.embed, self.proj = embed, proj
            self.layers = nn.HybridSequential(prefix="")
            for i in range(hp.num_dec_layers):
                self.layers.add(DecoderLayer(hp, prefix=f"layer{i}_", fused=fused, attention_impl=attention_impl))
            self.final_norm = LayerNorm(hp.d_model, prefix="final_norm_") if hp.pre_norm else None

    def hybrid_forward(self, F, tgt_in, tgt_valid_len, mem, src_valid_len):
        """tgt_in (B, T), tgt_valid_len (B,), mem (B, S, D) or time-major, src_valid_len (B,) -> (B, T, V)."""
        hp = self.hp
        x, positions = embed_sequence(F, self.embed, tgt_in, hp.d_model, hp.dropout)  # (B, T, D)
        # Causal mask as lengths: query t sees keys 0..t. Padded queries (t >= tgt_valid_len) are never seen by
        # valid ones, so no extra padding mask is needed.
        causal = F.broadcast_like(F.reshape(positions + 1, shape=(1, -1)), x, lhs_axes=(0,), rhs_axes=(0,))
        self_lengths = head_lengths(F, causal, hp.num_heads)  # (B*H, T)
        mem_lengths = head_lengths(F, lengths_like(F, src_valid_len, x), hp.num_heads)  # (B*H, T)
        if self.time_major:
            x = F.transpose(x, axes=(1, 0, 2))  # (T, B, D)
        for layer in self.layers:
            x = layer(x, self_lengths, mem, mem_lengths)
        x = final_norm(F, self.final_norm, x, self.fused)
        if self.time_major:
            x = F.transpose(x, axes=(1, 0, 2))  # (B, T, D): D wide, cheaper than transposing the V-wide logits
        # Zero padded positions so their logits are exactly 0 (finite, uniform) whatever the inputs there.
        x = F.SequenceMask(x, sequence_length=tgt_valid_len, use_sequence_length=True, axis=1)
        return self.proj(x)  # (B, T, V)


class DecoderStep(HybridBlock):
    """One incremental decoder step sharing every parameter with `decoder` (hybridized on its own)."""

    def __init__(self, decoder: TransformerDecoder, prefix: str | None = None):
        super().__init__(prefix=prefix)
        self.hp = decoder.hp
        with self.name_scope():
            self.decoder = decoder

    def hybrid_forward(self, F, tokens, step, src_valid_len, *caches):
        """tokens (N,), step (N,) position of `tokens`, src_valid_len (N,), caches = mem k/v per layer
        (N*H, S, d_k) then self k/v per layer (N*H, t+1, d_k).

        Returns [log_probs (N, V), attn (N, S), step + 1, new self k/v per layer (N*H, t+2, d_k)...].
        """
        hp, dec = self.hp, self.decoder
        x = dec.embed(tokens) * math.sqrt(hp.d_model) + positional_encoding(F, step, hp.d_model)  # (N, D)
        self_lengths = head_lengths(F, F.reshape(step + 1, shape=(-1, 1)), hp.num_heads)  # (N*H, 1)
        mem_lengths = head_lengths(F, F.reshape(src_valid_len, shape=(-1, 1)), hp.num_heads)  # (N*H, 1)
        num_layers = len(dec.layers)
        mem, cache = caches[:2 * num_layers], caches[2 * num_layers:]
        new_cache = []
        for i, layer in enumerate(dec.layers):
            x, k, v, probs = layer.step(F, x, cache[2 * i], cache[2 * i + 1], self_lengths,
                                        mem[2 * i], mem[2 * i + 1], mem_lengths)
            new_cache += [k, v]
        x = dec.final_norm.inference(F, x) if dec.final_norm is not None else x
        log_probs = F.log_softmax(dec.proj(x), axis=-1)  # (N, V)
        attn = F.mean(probs, axis=1)  # (N, S): last layer, averaged over heads
        return [log_probs, attn, step + 1] + new_cache


class TransformerModel(HybridBlock):
    """The dist_nmt model contract (see `dist_nmt.models`): forward, encode, init_decode_states, decode_step."""

    def __init__(self, hparams: TransformerHParams, vocab_size: int, prefix: str = "transformer_",
                 fused_ops: bool = False, attention_impl: str | None = None):
        """`fused_ops`: use the fused CPU ops (needs `dist_nmt.ops.load()` to have succeeded first).
        `attention_impl`: batch_dot | fused (needs `fused_ops`) | interleaved; None = fused if `fused_ops`."""
        super().__init__(prefix=prefix)
        hp = self.hp = hparams
        if hp.d_model % hp.num_heads or hp.d_model % 2:
            raise ValueError(f"d_model={hp.d_model} must be even and divisible by num_heads={hp.num_heads}")
        impl = self.attention_impl = check_impl(attention_impl or ("fused" if fused_ops else "batch_dot"))
        if impl == "fused" and not fused_ops:
            raise ValueError("attention_impl='fused' needs fused_ops=True (the dist_nmt.ops library loaded)")
        with self.name_scope():
            self.embed = nn.Embedding(vocab_size, hp.d_model, prefix="embed_",
                                      weight_initializer=init.Normal(hp.d_model ** -0.5))
            if hp.tie_embeddings:  # same Parameter object, so the same name and one gradient
                self.proj = nn.Dense(vocab_size, in_units=hp.d_model, flatten=False, use_bias=False,
                                     params=self.embed.params)
            else:
                self.proj = dense(vocab_size, hp.d_model, "proj_", use_bias=False)
            self.encoder = TransformerEncoder(hp, self.embed, prefix="enc_", fused=fused_ops, attention_impl=impl)
            self.decoder = TransformerDecoder(hp, self.embed, self.proj, prefix="dec_", fused=fused_ops,
                                              attention_impl=impl)
            self.step_block = DecoderStep(self.decoder, prefix="step_")

    def hybrid_forward(self, F, src, src_valid_len, tgt_in, tgt_valid_len):
        """src (B, S), src_valid_len (B,), tgt_in (B, T), tgt_valid_len (B,) -> logits (B, T, V) float32."""
        mem = self.encoder(src, src_valid_len)
        return self.decoder(tgt_in, tgt_valid_len, mem, src_valid_len)

    def hybridize(self, active: bool = True, **kwargs) -> None:
        """Hybridize everything as asked, except that the decode step never uses static memory planning: its
        cache inputs grow by one slot per step, and re-planning static memory for every new shape measured
        slower than the dynamic allocator."""
        super().hybridize(active, **kwargs)
        self.step_block.hybridize(active, **{**kwargs, "static_alloc": False, "static_shape": False})

    def encode(self, src, src_valid_len) -> list:
        """Encoder states [memory (B, S, D), src_valid_len (B,)], batch-first."""
        mem = self.encoder(src, src_valid_len)
        return [mem.transpose((1, 0, 2)) if self.encoder.time_major else mem, src_valid_len]  # (B, S, D)

    def init_decode_states(self, enc_states: list) -> list:
        """[step (B,), src_valid_len (B,), mem k/v per layer (B, H, S, d_k), self k/v per layer (B, H, 1, d_k)].

        The self-attention caches start with one masked dummy slot and grow by one slot per step (no length
        bound needed). All states are batch-first.
        """
        mem, src_valid_len = enc_states
        hp, batch = self.hp, mem.shape[0]
        mem_kv = []
        for layer in self.decoder.layers:
            mem_kv += layer.cross_attn.project_memory(mx.nd, mem)
        empty = mx.nd.zeros((batch, hp.num_heads, 1, hp.d_model // hp.num_heads), ctx=mem.context)
        step = mx.nd.zeros((batch,), ctx=mem.context)
        return [step, src_valid_len.astype("float32")] + mem_kv + [empty] * (2 * hp.num_dec_layers)

    @property
    def static_decode_states(self) -> tuple[int, ...]:
        """Indices of decode states that are the same for every beam of a sentence (never need reordering)."""
        return tuple(range(1, 2 + 2 * self.hp.num_dec_layers))

    def decode_step(self, tokens, states: list):
        """tokens (N,) -> (log_probs (N, V), new states, attn (N, S) last-layer cross-attention, head mean)."""
        num_static = 2 + 2 * self.hp.num_dec_layers
        # Heads go into the batch axis as free views here; the same reshape inside the graph would copy.
        heads = [s.reshape((-1,) + s.shape[2:]) for s in states[2:]]  # (N*H, L, d_k)
        with warnings.catch_warnings():
            # The step graph gets projected memory as input, so the cross-attention K/V weights it holds
            # (shared with the full decoder) are unused there by design.
            warnings.filterwarnings("ignore", message="Parameter .* is not used by any computation")
            out = self.step_block(tokens, states[0], states[1], *heads)
        log_probs, attn, step, new_cache = out[0], out[1], out[2], out[3:]
        new_cache = [c.reshape((-1, self.hp.num_heads) + c.shape[1:]) for c in new_cache]  # (N, H, t+2, d_k)
        return log_probs, [step] + list(states[1:num_static]) + new_cache, attn
