"""GNMT model contract: incremental decoding equals teacher forcing, masking, residual wiring, names, presets."""
from __future__ import annotations

import dataclasses

import mxnet as mx
import numpy as np
import pytest

from dist_nmt.config import load_config
from dist_nmt.models.gnmt import GNMTModel, final_states
from dist_nmt.models.hparams import GNMTHParams

VOCAB = 40
ATTENTIONS = ["mlp", "normed_mlp", "luong", "scaled_luong"]
DECODER_INITS = ["zeros", "encoder", "encoder_h"]


def tiny(**overrides) -> GNMTHParams:
    """3+3 layers so that bidirectional, plain and residual layers all appear; no dropout (eval equality)."""
    base = dict(num_enc_layers=3, num_dec_layers=3, hidden_size=16, embed_size=16, num_bi_layers=1,
                residual_from_layer=2, attention="normed_mlp", dropout=0.0, tie_embeddings=True)
    return GNMTHParams(**{**base, **overrides})


def build(hp: GNMTHParams, seed: int = 0, hybridize: bool = False) -> GNMTModel:
    mx.random.seed(seed)
    model = GNMTModel(hp, VOCAB)
    model.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0))
    if hybridize:
        model.hybridize(static_alloc=True)
    return model


def batch(seed: int = 0):
    """3 rows: full length, padded, and a dummy row (src length 1, tgt length 0)."""
    rng = np.random.RandomState(seed)
    src = mx.nd.array(rng.randint(3, VOCAB, (3, 7)), dtype="int32")
    tgt = mx.nd.array(rng.randint(3, VOCAB, (3, 6)), dtype="int32")
    return src, mx.nd.array([7, 4, 1]), tgt, mx.nd.array([6, 3, 0])


def greedy_states(model, src, src_len, tokens):
    """Run decode_step over given target tokens (B, T); returns log-probs (B, T, V) and attention (B, T, S)."""
    states = model.init_decode_states(model.encode(src, src_len))
    log_probs, attns = [], []
    for t in range(tokens.shape[1]):
        lp, states, attn = model.decode_step(tokens[:, t], states)
        log_probs.append(lp)
        attns.append(attn)
    return mx.nd.stack(*log_probs, axis=1), mx.nd.stack(*attns, axis=1)


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("decoder_init", DECODER_INITS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_incremental_decode_equals_teacher_forcing(hybridize, attention, decoder_init):
    model = build(tiny(attention=attention, decoder_init=decoder_init), hybridize=hybridize)
    _check_incremental(model)


def _check_incremental(model):
    src, src_len, tgt, tgt_len = batch()
    logits = model(src, src_len, tgt, tgt_len)
    assert logits.shape == (3, 6, VOCAB) and logits.dtype == np.float32
    ref = mx.nd.log_softmax(logits, axis=-1).asnumpy()
    inc, _ = greedy_states(model, src, src_len, tgt)
    for row, length in enumerate([6, 3]):
        np.testing.assert_allclose(inc.asnumpy()[row, :length], ref[row, :length], atol=1e-5)


@pytest.mark.parametrize("decoder_init", DECODER_INITS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padding_does_not_change_outputs(attention, decoder_init):
    model = build(tiny(attention=attention, decoder_init=decoder_init), hybridize=True)
    src, src_len, tgt, tgt_len = batch()
    logits = model(src, src_len, tgt, tgt_len).asnumpy()
    junk = src.copy()
    junk[1, 4:] = 1
    np.testing.assert_allclose(model(junk, src_len, tgt, tgt_len).asnumpy(), logits, atol=1e-6)
    # Same row without any padding (S = 4): valid logits agree with the padded batch.
    alone = model(src[1:2, :4], src_len[1:2], tgt[1:2, :3], tgt_len[1:2]).asnumpy()
    np.testing.assert_allclose(alone[0], logits[1, :3], atol=1e-5)
    assert np.all(logits[1, 3:] == 0), "padded target positions must give zero logits"


@pytest.mark.parametrize("attention,decoder_init", [("normed_mlp", "zeros"), ("scaled_luong", "encoder")])
def test_dummy_rows_are_finite_with_gradients(attention, decoder_init):
    model = build(tiny(dropout=0.1, attention=attention, decoder_init=decoder_init), hybridize=True)
    src, src_len, tgt, tgt_len = batch()
    with mx.autograd.record():
        logits = model(src, src_len, tgt, tgt_len)
        loss = (mx.nd.log_softmax(logits, axis=-1) * mx.nd.one_hot(tgt, VOCAB)).sum()
    loss.backward()
    assert np.isfinite(logits.asnumpy()).all()
    for name, param in model.collect_params().items():
        grad = param.grad().asnumpy()
        assert np.isfinite(grad).all(), name
        assert np.abs(grad).sum() > 0, f"{name} gets no gradient"


def test_parameter_names_are_deterministic_and_shapes_known_before_forward():
    params = build(tiny()).collect_params()
    for param in params.values():  # Horovod broadcasts right after initialize(): no deferred shapes allowed
        param.data()
    first = list(params.keys())
    second = list(build(tiny()).collect_params().keys())
    assert first == second
    assert all(name.startswith("gnmt_") for name in first)
    for expected in ("gnmt_embed_weight", "gnmt_enc_layer0_fwd_l0_i2h_weight", "gnmt_enc_layer0_bwd_l0_h2h_weight",
                     "gnmt_enc_layer2_l0_i2h_weight", "gnmt_dec_layer2_l0_h2h_bias", "gnmt_dec_att_key_weight",
                     "gnmt_dec_att_query_weight", "gnmt_dec_att_v", "gnmt_dec_att_g"):
        assert expected in first
    assert "gnmt_proj_weight" not in first, "tied projection reuses the embedding"
    untied = build(tiny(tie_embeddings=False, attention="mlp")).collect_params()
    assert untied["gnmt_proj_weight"].shape == (VOCAB, 16) and "gnmt_dec_att_g" not in untied
    luong = build(tiny(attention="scaled_luong")).collect_params()
    assert "gnmt_dec_att_query_weight" in luong and "gnmt_dec_att_query_bias" not in luong
    assert not any(name.startswith("gnmt_dec_att_key") or name == "gnmt_dec_att_v" for name in luong)


def test_parameter_shapes_follow_the_wiring():
    params = build(tiny(hidden_size=16, embed_size=8, tie_embeddings=False)).collect_params()
    assert params["gnmt_enc_layer0_fwd_l0_i2h_weight"].shape == (4 * 8, 8)  # H/2 per direction, reads E
    assert params["gnmt_enc_layer1_l0_i2h_weight"].shape == (4 * 16, 16)
    assert params["gnmt_dec_layer0_l0_i2h_weight"].shape == (4 * 16, 8)  # bottom layer reads the embedding
    assert params["gnmt_dec_layer1_l0_i2h_weight"].shape == (4 * 16, 32)  # output ++ attention context


def test_attention_sums_to_one_over_valid_source():
    model = build(tiny(), hybridize=True)
    src, src_len, tgt, tgt_len = batch()
    _, attn = greedy_states(model, src, src_len, tgt)  # (B, T, S)
    _, probs = model.decoder(tgt, tgt_len, *_memory_and_keys(model, src, src_len), src_len)
    for a in (attn.asnumpy(), probs.asnumpy()):
        for row, length in enumerate([7, 4, 1]):
            np.testing.assert_allclose(a[row, :, :length].sum(-1), 1.0, atol=1e-5)
            assert np.all(a[row, :, length:] == 0)


def _memory_and_keys(model, src, src_len):
    memory, keys, _ = model.encode(src, src_len)[:3]
    return memory, keys


def _zero_layer(model, prefix: str) -> None:
    """An LSTM layer with all-zero weights and biases outputs exactly 0 (c stays 0, h = o * tanh(0))."""
    for name, param in model.collect_params().items():
        if name.startswith(prefix):
            param.set_data(mx.nd.zeros(param.shape))


def test_residual_from_layer_is_respected():
    src, src_len, tgt, tgt_len = batch()
    deep = build(tiny(residual_from_layer=3))
    for prefix in ("gnmt_enc_layer2_", "gnmt_dec_layer2_"):
        _zero_layer(deep, prefix)
    # With a residual, a zeroed top layer passes its input through: same as the 2-layer model.
    shallow = build(tiny(num_enc_layers=2, num_dec_layers=2, residual_from_layer=3), seed=1)
    deep_params = deep.collect_params()
    for name, param in shallow.collect_params().items():
        param.set_data(deep_params[name].data())
    np.testing.assert_allclose(deep(src, src_len, tgt, tgt_len).asnumpy(),
                               shallow(src, src_len, tgt, tgt_len).asnumpy(), atol=1e-5)
    # Without a residual at layer 3 the zeroed top decoder layer outputs 0, hence all-zero logits.
    plain = build(tiny(residual_from_layer=4))
    plain_params = plain.collect_params()
    for name, param in deep_params.items():
        plain_params[name].set_data(param.data())
    assert np.all(plain(src, src_len, tgt, tgt_len).asnumpy() == 0)


@pytest.mark.parametrize("field,value", [("residual_from_layer", 1), ("hidden_size", 15), ("num_bi_layers", 4),
                                         ("num_dec_layers", 1), ("attention", "dot"), ("decoder_init", "mean")])
def test_invalid_sizes_raise(field, value):
    with pytest.raises(ValueError, match=field):
        GNMTModel(tiny(**{field: value}), VOCAB)


def test_encoder_init_needs_matching_layer_counts():
    with pytest.raises(ValueError, match="num_enc_layers == num_dec_layers.*decoder_init=zeros"):
        GNMTModel(tiny(num_dec_layers=2, decoder_init="encoder"), VOCAB)


def _lstm_alone(lstm, x):
    """Final (h, c) of `lstm` over an unpadded sequence x (S, 1, I): the fused op's own state outputs."""
    _, (h, c) = lstm(x, lstm.begin_state(batch_size=1))
    return h[0, 0].asnumpy(), c[0, 0].asnumpy()


@pytest.mark.parametrize("hybridize", [False, True])
def test_final_states_equal_an_unpadded_run_per_row(hybridize):
    from mxnet.gluon import HybridBlock, rnn

    class Finals(HybridBlock):
        def __init__(self):
            super().__init__(prefix="f_")
            with self.name_scope():
                self.lstm = rnn.LSTM(6, num_layers=1, layout="TNC", input_size=4, prefix="lstm_")

        def hybrid_forward(self, F, x, lengths):
            return final_states(F, self.lstm, x, self.lstm(x), lengths)

    mx.random.seed(0)
    block = Finals()
    block.initialize(mx.init.Uniform(1.0))  # large weights: saturated gates, cell values well past 1
    if hybridize:
        block.hybridize(static_alloc=True)
    x = mx.nd.random.normal(shape=(7, 3, 4)) * 3
    h, c = block(x, mx.nd.array([7, 4, 1]))
    for row, length in enumerate([7, 4, 1]):
        h_ref, c_ref = _lstm_alone(block.lstm, x[:length, row:row + 1])
        np.testing.assert_allclose(h[row].asnumpy(), h_ref, atol=1e-5)
        np.testing.assert_allclose(c[row].asnumpy(), c_ref, rtol=1e-4, atol=1e-5)
    assert np.abs(c.asnumpy()).max() > 1.5, "test should reach cell values that tanh(h) could not recover"


def test_decoder_starts_from_each_encoder_layers_true_final_state():
    model = build(tiny(decoder_init="encoder"))
    src, src_len, _, _ = batch()
    enc = model.encode(src, src_len)
    finals = [a.asnumpy() for a in enc[3:]]  # h, c per layer (B, H)
    assert len(finals) == 6 and all(f.shape == (3, 16) for f in finals)
    row, length = 1, 4
    x = model.embed(src[row:row + 1, :length].T)  # (S, 1, E) unpadded
    layers = model.encoder.layers
    h_fwd, c_fwd = _lstm_alone(layers[0], x)
    h_bwd, c_bwd = _lstm_alone(layers[1], x[::-1])  # backward direction: after reading the first token
    np.testing.assert_allclose(finals[0][row], np.concatenate([h_fwd, h_bwd]), atol=1e-5)
    np.testing.assert_allclose(finals[1][row], np.concatenate([c_fwd, c_bwd]), atol=1e-5)
    states = model.init_decode_states(enc)
    assert len(states) == 3 + 6 and states[3] is enc[3]
    h_only = build(tiny(decoder_init="encoder_h")).encode(src, src_len)
    np.testing.assert_allclose(h_only[3].asnumpy(), finals[0], atol=1e-6)
    assert np.all(h_only[4].asnumpy() == 0)
    src, src_len, tgt, tgt_len = batch()  # same parameters (same seed), only the initial states differ
    from_zeros = build(tiny())(src, src_len, tgt, tgt_len).asnumpy()
    assert np.abs(model(src, src_len, tgt, tgt_len).asnumpy()[:2] - from_zeros[:2]).max() > 1e-3


def test_deep_preset_with_residuals_from_layer_3_decodes_like_it_trains():
    """gnmt_4x1024's wiring (4+4 layers, 1 bidirectional, residuals from layer 3) at small sizes."""
    from dist_nmt.decode import translate_batch

    preset = load_config("configs/models/gnmt_4x1024.yaml", ["train.max_updates=1"]).model.gnmt
    assert (preset.num_enc_layers, preset.num_dec_layers, preset.residual_from_layer) == (4, 4, 3)
    for decoder_init in ("zeros", "encoder"):
        hp = dataclasses.replace(preset, hidden_size=16, embed_size=16, dropout=0.0, decoder_init=decoder_init)
        model = build(hp, hybridize=True)
        _check_incremental(model)
        src, src_len, _, _ = batch()
        hyps = translate_batch(model, src, src_len, beam_size=3, alpha=1.0, beta=0.2, max_len_a=1.0, max_len_b=2,
                               nbest=2)
        assert all(len(h) == 2 and h[0][1] >= h[1][1] and np.isfinite(h[0][1]) for h in hyps)


@pytest.mark.parametrize("preset", ["gnmt_tiny", "gnmt_2x512", "gnmt_4x1024"])
def test_presets_load(preset):
    cfg = load_config(f"configs/models/{preset}.yaml", ["train.max_updates=1"])
    assert cfg.model.arch == "gnmt"
    if preset == "gnmt_tiny":
        model = GNMTModel(cfg.model.gnmt, VOCAB)
        model.initialize()
        src, src_len, tgt, tgt_len = batch()
        assert model(src, src_len, tgt, tgt_len).shape == (3, 6, VOCAB)


def test_registered_in_models():
    from dist_nmt.models import build_model

    assert isinstance(build_model("gnmt", tiny(), VOCAB), GNMTModel)


def _hand_greedy(model, src, src_len, max_lengths, bos_id: int = 2, eos_id: int = 3):
    """Plain argmax loop over decode_step (EOS forced at each row's cap); returns [(tokens, summed log-prob)]."""
    states = model.init_decode_states(model.encode(src, src_len))
    tokens = mx.nd.full((src.shape[0],), bos_id)
    out = [([], 0.0, False) for _ in range(src.shape[0])]
    for t in range(int(max(max_lengths)) + 1):
        log_probs, states, _ = model.decode_step(tokens, states)
        log_probs = log_probs.asnumpy()
        best = log_probs.argmax(axis=1)
        for b, (toks, score, done) in enumerate(out):
            if done:
                continue
            best[b] = eos_id if t >= max_lengths[b] else best[b]
            out[b] = (toks + ([] if best[b] == eos_id else [int(best[b])]), score + log_probs[b, best[b]],
                      bool(best[b] == eos_id))
        tokens = mx.nd.array(best)
    return [(toks, score) for toks, score, _ in out]


@pytest.mark.parametrize("hybridize", [False, True])
def test_beam_one_equals_greedy_and_beam_search_runs(hybridize):
    from dist_nmt.decode import max_output_lengths, translate_batch

    model = build(tiny(), hybridize=hybridize)
    src, src_len, _, _ = batch()
    hyps = translate_batch(model, src, src_len, beam_size=1, alpha=0.0, beta=0.0, max_len_a=1.0, max_len_b=2)
    expected = _hand_greedy(model, src, src_len, max_output_lengths(src_len.asnumpy(), 1.0, 2))
    for (best,), (tokens, score) in zip(hyps, expected, strict=True):
        assert best[0] == tokens
        assert best[1] == pytest.approx(score, abs=1e-4)
    beams = translate_batch(model, src, src_len, beam_size=3, alpha=0.6, beta=0.2, max_len_a=1.0, max_len_b=2,
                            nbest=3)
    assert all(len(nbest) == 3 and np.isfinite([s for _, s in nbest]).all() for nbest in beams)


def test_chunked_attention_with_encoder_init_decodes_like_it_trains():
    _check_incremental(build(tiny(attention_chunk_units=5, decoder_init="encoder"), hybridize=True))
