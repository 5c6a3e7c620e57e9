"""GNMT (Wu et al., 2016): bidirectional + residual LSTM encoder, residual LSTM decoder with attention.

Shapes: B batch (B*K under beam search), S source length, T target length, E embedding size, H hidden size,
A attention units (= H), V vocab. Recurrent layers run time-major: (S, B, H) / (T, B, H).

    model = GNMTModel(GNMTHParams(hidden_size=32, embed_size=32), vocab_size=100)
    model.initialize()
    model.hybridize(static_alloc=True)
    logits = model(src, src_valid_len, tgt_in, tgt_valid_len)        # (B, T, V)
    states = model.init_decode_states(model.encode(src, src_valid_len))
    log_probs, states, attn = model.decode_step(bos_tokens, states)  # (B, V), [...], (B, S)

Wiring (layers numbered from 1, as in the paper):
- Encoder: shared embedding -> `num_bi_layers` bidirectional layers -> unidirectional layers up to
  `num_enc_layers`. A bidirectional layer has H/2 units per direction, so every layer outputs H and residuals
  work at any depth (Sockeye's choice; GluonNLP uses H per direction then a 2H-input second layer, which costs
  about 2x the parameters there). The backward direction reads each row reversed over its valid prefix
  (`SequenceReverse` with lengths), so it starts at the true last token: the fused RNN op ignores
  `use_sequence_length` on CPU in MXNet 1.9.1 (measured: the backward outputs of valid positions changed
  with the padding), hence two unidirectional fused LSTMs instead of one bidirectional one.
- Decoder: layer 1 reads the target embedding; the attention (`attention`: additive `mlp` (Bahdanau),
  `normed_mlp` (GNMT's weight-normalised score vector g·v/|v|), or multiplicative `luong` / `scaled_luong` (÷√A,
  GluonNLP's default); see `models.attention`) is queried with layer 1's output at the same step, and its context is
  concatenated to the input of every layer above (the TF-NMT `gnmt_v2` wiring). Nothing is fed back from attention into
  layer 1, so in teacher-forced training every decoder layer is one fused LSTM call over all T steps.
- Layer l adds its input's hidden part (the previous layer's output) when l >= `residual_from_layer`
  (>= 2: layer 1's input is the embedding). Dropout is applied to every layer's input and to the top output.
- Decoder initial states (`decoder_init`): `zeros`, or, as TF-NMT and GluonNLP pass them, decoder layer l starts
  from encoder layer l's final (h, c) at each row's true last token (`encoder`; a bidirectional layer gives
  [forward after the last token | backward after the first], H/2 + H/2), or only its final h with c = 0
  (`encoder_h`). Needs as many encoder as decoder layers. The fused CPU LSTM ignores sequence lengths, so h is
  read from the outputs and c is recomputed from the gates (`final_states`). Padded target positions get logits
  exactly 0.
- Incremental decoding uses `LSTMCell`s holding the very same Parameter objects as the fused layers, and the
  same attention block with T = 1, so stepping reproduces the teacher-forced forward (tested to 1e-5).
- `fused_ops=True` (model.fused_ops, the fused CPU ops loaded) computes the additive score with one op
  (`dn_additive_score`) that stores no (B, T, S, A) tensor; parameters and their names are the same either way.

Speed notes (2 cores, OMP_NUM_THREADS=2, MXNet 1.9.1 CPU; the machine was shared, so best of several runs):
- gnmt_2x512, vocab 8000, tied, hybridized (static_alloc), Adam, batch 128 x 25, forward + backward + update:
  best observed 1.37 s/step = ~4,700 tokens/s counting source + target tokens (Transformer-base: ~1,260 on the
  same benchmark); the cores were never idle while measuring, so treat it as a lower bound.
- One fused LSTM layer (T=25, B=128, H=512) forward + backward: 140 ms vs 254 ms for an unrolled LSTMCell,
  hence fused layers everywhere in training and cells only for incremental decoding.
- Additive attention tensors are (B, T, S, A) (`attention_chunk_units` narrows the temporaries): `F.tanh` there
  took ~600 ms vs ~55-75 ms for `F.Activation(tanh)` (oneDNN eltwise), and `batch_dot` (probs x values) was
  erratic (2-1000 ms) where `linalg.gemm2` took 1-4 ms (backward 11 vs 38 ms). Both replaced.
"""
from __future__ import annotations

import logging

import mxnet as mx
from mxnet import gluon, init
from mxnet.gluon import HybridBlock, nn, rnn

from dist_nmt.models.attention import ADDITIVE_ATTENTION, GNMT_ATTENTION, gnmt_attention
from dist_nmt.models.hparams import GNMTHParams

logger = logging.getLogger(__name__)
_FORGET_BIAS = init.LSTMBias(forget_bias=1.0)  # one object: fused layers and their cells must agree on init
DECODER_INIT = ("encoder", "encoder_h", "zeros")


def _check(hp: GNMTHParams) -> None:
    """Raise ValueError naming the field and the fix for sizes this wiring cannot build."""
    if hp.num_bi_layers > hp.num_enc_layers or hp.num_enc_layers < 1:
        raise ValueError(f"need 1 <= num_enc_layers and num_bi_layers <= num_enc_layers; got "
                         f"num_enc_layers={hp.num_enc_layers}, num_bi_layers={hp.num_bi_layers}")
    if hp.num_dec_layers < 2:
        raise ValueError(f"num_dec_layers={hp.num_dec_layers} must be >= 2: the attention context feeds the "
                         "decoder layers above the first, so one layer would ignore the source")
    if hp.num_bi_layers and hp.hidden_size % 2:
        raise ValueError(f"hidden_size={hp.hidden_size} must be even: bidirectional layers use hidden_size/2 "
                         "units per direction")
    if hp.residual_from_layer < 2:
        raise ValueError(f"residual_from_layer={hp.residual_from_layer} must be >= 2 (layer 1 reads the "
                         "embedding); use a value above the layer count for no residuals")
    if hp.attention not in GNMT_ATTENTION:
        raise ValueError(f"unknown attention '{hp.attention}'; choose one of: {', '.join(GNMT_ATTENTION)}")
    if hp.decoder_init not in DECODER_INIT:
        raise ValueError(f"unknown decoder_init '{hp.decoder_init}'; choose one of: {', '.join(DECODER_INIT)}")
    if hp.decoder_init != "zeros" and hp.num_enc_layers != hp.num_dec_layers:
        raise ValueError(f"decoder_init={hp.decoder_init} maps encoder layer l to decoder layer l, so it needs "
                         f"num_enc_layers == num_dec_layers (got {hp.num_enc_layers}, {hp.num_dec_layers}); "
                         "use decoder_init=zeros otherwise")


def _residual(layer: int, hp: GNMTHParams) -> bool:
    """Whether 0-based `layer` adds its input (GNMT counts layers from 1)."""
    return layer + 1 >= hp.residual_from_layer


def _dropout(F, x, p: float):
    """Dropout with rate p (a no-op outside autograd training mode); skipped entirely when p == 0."""
    return F.Dropout(x, p=p, cudnn_off=True) if p else x  # cuDNN dropout ignores mx.random.seed


def _fused_lstm(hidden_size: int, input_size: int, prefix: str) -> rnn.LSTM:
    """One time-major fused LSTM layer (oneDNN RNN kernel); forget-gate bias starts at 1."""
    return rnn.LSTM(hidden_size, num_layers=1, layout="TNC", input_size=input_size, prefix=prefix,
                    i2h_bias_initializer=_FORGET_BIAS)


def _shared_cell(lstm: rnn.LSTM, hidden_size: int, input_size: int) -> rnn.LSTMCell:
    """An LSTMCell holding the same Parameter objects as a 1-layer fused `lstm` (same gate order i, f, g, o)."""
    shared = gluon.ParameterDict(lstm.prefix + "l0_")
    shared.update(lstm.params)  # one-level sharing: get('i2h_weight') finds '<lstm prefix>l0_i2h_weight'
    return rnn.LSTMCell(hidden_size, input_size=input_size, params=shared,
                        i2h_bias_initializer=_FORGET_BIAS)


def _param(F, param, like):
    """A Parameter as a graph input of the calling block (symbol when hybridized, array otherwise)."""
    return param.var() if F is mx.sym else param.data(like.context)


def final_states(F, lstm: rnn.LSTM, inp, out, lengths, with_cell: bool = True):
    """(h, c) of 1-layer fused `lstm` after each row's last valid step: inp (S, B, I), out = lstm(inp) (S, B, U),
    lengths (B,) >= 1 -> h, c (B, U).

    h is the output at position length-1. The fused op cannot stop at a length, so c is rebuilt from the gates,
    which depend only on x_t and h_{t-1} = out_{t-1}: given them, c_t = f_t c_{t-1} + i_t g_t is linear, hence
    c_{L-1} = sum_{t<L} exp(C_{L-1} - C_t) i_t g_t with C_t = sum_{u<=t} log f_u (a prefix sum, one GEMM with a
    triangular matrix; exponents are <= 0, so nothing overflows). Costs about one more pass of the layer's GEMMs.
    """
    h = F.SequenceLast(out, sequence_length=lengths, use_sequence_length=True)  # (B, U)
    if not with_cell:
        return h, F.zeros_like(h)
    units = lstm._hidden_size
    h_prev = F.slice_axis(F.concat(F.zeros_like(F.slice_axis(out, axis=0, begin=0, end=1)), out, dim=0),
                          axis=0, begin=0, end=-1)  # (S, B, U): h_{t-1}, zeros first
    gates = (F.FullyConnected(inp, _param(F, lstm.l0_i2h_weight, inp), _param(F, lstm.l0_i2h_bias, inp),
                              num_hidden=4 * units, flatten=False)
             + F.FullyConnected(h_prev, _param(F, lstm.l0_h2h_weight, inp), _param(F, lstm.l0_h2h_bias, inp),
                                num_hidden=4 * units, flatten=False))  # (S, B, 4U), gate order i, f, g, o
    i, f, g, _ = F.split(gates, num_outputs=4, axis=2)  # 4 x (S, B, U)
    log_f = -F.Activation(-f, act_type="softrelu")  # log sigmoid(f), stable
    ig = F.Activation(i, act_type="sigmoid") * F.Activation(g, act_type="tanh")  # (S, B, U)
    pos = F.contrib.arange_like(log_f, axis=0)  # (S,)
    lower = F.broadcast_greater_equal(F.reshape(pos, shape=(-1, 1)), F.reshape(pos, shape=(1, -1)))  # (S, S)
    prefix = F.reshape_like(F.linalg.gemm2(lower, F.reshape(log_f, shape=(0, -1))), log_f)  # C_t (S, B, U)
    last = F.SequenceLast(prefix, sequence_length=lengths, use_sequence_length=True)  # C_{L-1} (B, U)
    decay = F.broadcast_sub(F.expand_dims(last, axis=0), prefix)  # (S, B, U)
    # Steps t >= L get exponent -1e4 (weight exactly 0, zero gradient) instead of a positive one.
    decay = F.SequenceMask(decay, sequence_length=lengths, use_sequence_length=True, value=-1e4)
    return h, F.sum(F.exp(decay) * ig, axis=0)  # (B, U)


def _log_attention_path(hp: GNMTHParams, fused: bool) -> None:
    """Say which additive-score implementation the model runs (memory differs by orders of magnitude)."""
    if hp.attention not in ADDITIVE_ATTENTION:
        return
    if fused:
        logger.info("GNMT %s attention: fused score op dn_additive_score (no (B, T, S, A) tensor)%s", hp.attention,
                    "; attention_chunk_units unused" if hp.attention_chunk_units else "")
    else:
        logger.info("GNMT %s attention: pure-MXNet score, (B, T, S, A) temporaries (attention_chunk_units=%d)",
                    hp.attention, hp.attention_chunk_units)


class GNMTEncoder(HybridBlock):
    """Embedding -> bidirectional layers (H/2 per direction) -> unidirectional layers, with residuals."""

    def __init__(self, hp: GNMTHParams, embed: nn.Embedding, prefix: str | None = None):
        super().__init__(prefix=prefix)
        self.hp = hp
        with self.name_scope():
            self.embed = embed
            self.layers = nn.HybridSequential(prefix="")
            for i in range(hp.num_enc_layers):
                input_size = hp.embed_size if i == 0 else hp.hidden_size
                if i < hp.num_bi_layers:
                    self.layers.add(_fused_lstm(hp.hidden_size // 2, input_size, f"layer{i}_fwd_"),
                                    _fused_lstm(hp.hidden_size // 2, input_size, f"layer{i}_bwd_"))
                else:
                    self.layers.add(_fused_lstm(hp.hidden_size, input_size, f"layer{i}_"))

    def hybrid_forward(self, F, src, src_valid_len):
        """src (B, S) token ids, src_valid_len (B,) -> [memory (B, S, H), then unless decoder_init is zeros the
        final h, c (B, H) of every layer]; padded memory positions hold junk."""
        hp, finals = self.hp, []
        lengths = F.clip(src_valid_len, 1, 1e9)  # dummy rows (length 0) read one step
        x = self.embed(F.transpose(src))  # (S, B, E)
        for i in range(hp.num_enc_layers):
            inp = _dropout(F, x, hp.dropout)
            if i < hp.num_bi_layers:
                fwd, bwd = self.layers[2 * i], self.layers[2 * i + 1]
                rev = F.SequenceReverse(inp, sequence_length=src_valid_len, use_sequence_length=True)
                out_fwd, out_rev = fwd(inp), bwd(rev)  # (S, B, H/2) each; out_rev in reversed order
                out = F.concat(out_fwd, F.SequenceReverse(out_rev, sequence_length=src_valid_len,
                                                          use_sequence_length=True), dim=2)  # (S, B, H)
                if hp.decoder_init != "zeros":  # forward after the last token, backward after the first
                    pairs = [final_states(F, fwd, inp, out_fwd, lengths, hp.decoder_init == "encoder"),
                             final_states(F, bwd, rev, out_rev, lengths, hp.decoder_init == "encoder")]
                    finals += [F.concat(pairs[0][k], pairs[1][k], dim=1) for k in (0, 1)]  # h, c (B, H)
            else:
                layer = self.layers[hp.num_bi_layers + i]
                out = layer(inp)  # (S, B, H)
                if hp.decoder_init != "zeros":
                    finals += final_states(F, layer, inp, out, lengths, hp.decoder_init == "encoder")
            x = out + x if _residual(i, hp) else out
        return [F.swapaxes(x, 0, 1)] + finals  # memory (B, S, H)


class GNMTDecoder(HybridBlock):
    """Teacher-forced decoder: every layer is one fused LSTM over all T steps (attention from layer 1)."""

    def __init__(self, hp: GNMTHParams, embed: nn.Embedding, proj: nn.Dense, prefix: str | None = None,
                 fused: bool = False):
        super().__init__(prefix=prefix)
        self.hp = hp
        with self.name_scope():
            self.embed, self.proj = embed, proj
            self.attention = gnmt_attention(hp.attention, hp.hidden_size, hp.attention_chunk_units, prefix="att_",
                                            fused=fused)
            self.layers = nn.HybridSequential(prefix="")
            for i in range(hp.num_dec_layers):
                input_size = hp.embed_size if i == 0 else 2 * hp.hidden_size
                self.layers.add(_fused_lstm(hp.hidden_size, input_size, f"layer{i}_"))

    def hybrid_forward(self, F, tgt_in, tgt_valid_len, memory, keys, src_valid_len, *init_states):
        """tgt_in (B, T), tgt_valid_len (B,), memory (B, S, H), keys (B, S, A), src_valid_len (B,), optional
        initial h, c (B, H) per layer -> logits (B, T, V), attention probs (B, T, S)."""
        hp = self.hp
        x = self._layer(F, 0, _dropout(F, self.embed(F.transpose(tgt_in)), hp.dropout), init_states)  # (T, B, H)
        query = F.swapaxes(x, 0, 1)  # (B, T, H)
        lengths = F.broadcast_like(F.reshape(src_valid_len, shape=(-1, 1)), query, lhs_axes=(1,), rhs_axes=(1,))
        ctx, probs = self.attention(query, keys, memory, lengths)  # (B, T, H), (B, T, S)
        ctx = F.swapaxes(ctx, 0, 1)  # (T, B, H)
        for i in range(1, hp.num_dec_layers):
            out = self._layer(F, i, _dropout(F, F.concat(x, ctx, dim=2), hp.dropout), init_states)  # (T, B, H)
            x = out + x if _residual(i, hp) else out
        x = F.swapaxes(x, 0, 1)  # (B, T, H)
        # Zero padded positions so their logits are exactly 0 (finite) whatever the inputs there.
        x = F.SequenceMask(x, sequence_length=tgt_valid_len, use_sequence_length=True, axis=1)
        return self.proj(_dropout(F, x, hp.dropout)), probs  # (B, T, V)

    def _layer(self, F, i: int, inp, init_states):
        """Fused layer i over inp (T, B, I), from zeros or from init_states[2i], [2i+1] (B, H)."""
        if not init_states:
            return self.layers[i](inp)
        out, _ = self.layers[i](inp, [F.expand_dims(init_states[2 * i + k], axis=0) for k in (0, 1)])
        return out


class GNMTDecoderStep(HybridBlock):
    """One incremental decoder step: LSTMCells sharing the decoder's fused-layer parameters."""

    def __init__(self, decoder: GNMTDecoder, prefix: str | None = None):
        super().__init__(prefix=prefix)
        hp = self.hp = decoder.hp
        with self.name_scope():
            self.embed, self.proj, self.attention = decoder.embed, decoder.proj, decoder.attention
            self.cells = nn.HybridSequential(prefix="")
            for i, lstm in enumerate(decoder.layers):
                input_size = hp.embed_size if i == 0 else 2 * hp.hidden_size
                self.cells.add(_shared_cell(lstm, hp.hidden_size, input_size))

    def hybrid_forward(self, F, tokens, memory, keys, src_valid_len, *states):
        """tokens (B,), memory (B, S, H), keys (B, S, A), src_valid_len (B,), states = h, c per layer (B, H).

        Returns [log_probs (B, V), attn (B, S), new h, c per layer (B, H)...].
        """
        hp = self.hp
        x, new_states = self.embed(tokens), []  # (B, E)
        for i, cell in enumerate(self.cells):
            if i == 0:
                out, hc = cell(x, [states[0], states[1]])  # (B, H)
                query = F.expand_dims(out, axis=1)  # (B, 1, H)
                ctx, probs = self.attention(query, keys, memory, F.reshape(src_valid_len, shape=(-1, 1)))
                ctx = F.reshape(ctx, shape=(0, -1))  # (B, H)
            else:
                out, hc = cell(F.concat(x, ctx, dim=1), [states[2 * i], states[2 * i + 1]])  # (B, H)
                out = out + x if _residual(i, hp) else out
            x, new_states = out, new_states + hc
        log_probs = F.log_softmax(self.proj(x), axis=-1)  # (B, V)
        return [log_probs, F.reshape(probs, shape=(0, -1))] + new_states  # attn (B, S)


class GNMTModel(HybridBlock):
    """The dist_nmt model contract (see `dist_nmt.models`): forward, encode, init_decode_states, decode_step."""

    def __init__(self, hparams: GNMTHParams, vocab_size: int, prefix: str = "gnmt_", fused_ops: bool = False):
        """`fused_ops`: additive attention scores through the fused CPU op (needs `dist_nmt.ops.load()` first)."""
        super().__init__(prefix=prefix)
        _check(hparams)
        hp = self.hp = hparams
        _log_attention_path(hp, fused_ops)
        with self.name_scope():
            self.embed = nn.Embedding(vocab_size, hp.embed_size, prefix="embed_", weight_initializer=init.Uniform(0.1))
            if hp.tie_embeddings and hp.embed_size == hp.hidden_size:  # same Parameter: one name, one gradient
                self.proj = nn.Dense(vocab_size, flatten=False, use_bias=False, params=self.embed.params)
            else:
                if hp.tie_embeddings:
                    logger.warning("tie_embeddings needs embed_size == hidden_size (%d != %d); using a separate "
                                   "output projection", hp.embed_size, hp.hidden_size)
                self.proj = nn.Dense(vocab_size, flatten=False, use_bias=False, in_units=hp.hidden_size,
                                     prefix="proj_")
            self.encoder = GNMTEncoder(hp, self.embed, prefix="enc_")
            # Additive attention projects the memory once per source; scaled_luong uses it as it is.
            self.key_proj = nn.Dense(hp.hidden_size, flatten=False, use_bias=False, in_units=hp.hidden_size,
                                     prefix="dec_att_key_") if hp.attention in ADDITIVE_ATTENTION else None
            self.decoder = GNMTDecoder(hp, self.embed, self.proj, prefix="dec_", fused=fused_ops)
            self.step_block = GNMTDecoderStep(self.decoder, prefix="step_")

    def hybrid_forward(self, F, src, src_valid_len, tgt_in, tgt_valid_len):
        """src (B, S), src_valid_len (B,), tgt_in (B, T), tgt_valid_len (B,) -> logits (B, T, V) float32."""
        memory, *finals = self.encoder(src, src_valid_len)  # (B, S, H), h/c (B, H) per layer
        logits, _ = self.decoder(tgt_in, tgt_valid_len, memory, self._keys(memory), src_valid_len, *finals)
        return logits

    def _keys(self, memory):
        return self.key_proj(memory) if self.key_proj is not None else memory  # (B, S, A)

    def encode(self, src, src_valid_len) -> list:
        """Encoder states [memory (B, S, H), attention keys (B, S, A), src_valid_len (B,), then unless
        decoder_init is zeros the final h, c (B, H) per layer], batch-first."""
        memory, *finals = self.encoder(src, src_valid_len)
        return [memory, self._keys(memory), src_valid_len.astype("float32")] + list(finals)

    def init_decode_states(self, enc_states: list) -> list:
        """[memory, keys, src_valid_len, then h (B, H), c (B, H) per decoder layer]: the encoder's final states,
        or zeros when decoder_init is zeros. Everything is batch-first; nothing grows with the target."""
        if self.hp.decoder_init != "zeros":
            return list(enc_states)
        memory = enc_states[0]
        zeros = mx.nd.zeros((memory.shape[0], self.hp.hidden_size), ctx=memory.context)
        return list(enc_states) + [zeros] * (2 * self.hp.num_dec_layers)

    @property
    def static_decode_states(self) -> tuple[int, ...]:
        """Indices of decode states that are the same for every beam of a sentence (never need reordering)."""
        return (0, 1, 2)

    def decode_step(self, tokens, states: list):
        """tokens (B,) -> (log_probs (B, V), new states, attn (B, S) of the single attention)."""
        out = self.step_block(tokens, *states)
        return out[0], list(states[:3]) + list(out[2:]), out[1]
