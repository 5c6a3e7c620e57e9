"""TransformerModel: incremental decoding equals teacher forcing, masking, dummy rows, names, presets; the
interleaved attention path equals the batch_dot one (forward, gradients, a training curve)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn
from unit.test_ops import adam_losses

from dist_nmt.config import load_config
from dist_nmt.models import MODELS, TransformerHParams, build_model
from dist_nmt.models.transformer import LayerNorm

VOCAB = 50
TINY = TransformerHParams(num_enc_layers=2, num_dec_layers=2, d_model=32, d_ff=64, num_heads=4, dropout=0.1,
                          attention_dropout=0.1, activation_dropout=0.1)
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def make_model(hp: TransformerHParams = TINY, seed: int = 0, hybridize: bool = True, impl: str = "batch_dot"):
    mx.random.seed(seed)
    model = build_model("transformer", hp, VOCAB, attention_impl=impl)
    model.initialize()
    if hybridize:
        model.hybridize(static_alloc=True)
    return model


def batch(seed: int = 0):
    """src (3, 7), tgt (3, 6) with ragged valid lengths."""
    rng = np.random.RandomState(seed)
    src = mx.nd.array(rng.randint(4, VOCAB, size=(3, 7)))
    tgt = mx.nd.array(rng.randint(4, VOCAB, size=(3, 6)))
    return src, mx.nd.array([7, 4, 2]), tgt, mx.nd.array([6, 3, 5])


def incremental_log_probs(model, src, src_len, tgt):
    states = model.init_decode_states(model.encode(src, src_len))
    steps = []
    for t in range(tgt.shape[1]):
        log_probs, states, attn = model.decode_step(tgt[:, t], states)
        steps.append(log_probs)
    return mx.nd.stack(*steps, axis=1), attn  # (B, T, V), last (B, S)


@pytest.mark.parametrize("impl", ["batch_dot", "interleaved"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_incremental_decoding_equals_teacher_forced_forward(pre_norm, impl):
    model = make_model(replace(TINY, pre_norm=pre_norm), impl=impl)
    src, src_len, tgt, _ = batch()
    full_len = mx.nd.full((3,), tgt.shape[1])
    expected = mx.nd.log_softmax(model(src, src_len, tgt, full_len), axis=-1).asnumpy()
    got, attn = incremental_log_probs(model, src, src_len, tgt)
    np.testing.assert_allclose(got.asnumpy(), expected, atol=1e-5, rtol=0)
    attn = attn.asnumpy()
    np.testing.assert_allclose(attn.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(attn[1, 4:] == 0) and np.all(attn[2, 2:] == 0)  # no attention to source padding


def test_hybridized_equals_imperative():
    src, src_len, tgt, tgt_len = batch()
    model = make_model(hybridize=False)
    eager = model(src, src_len, tgt, tgt_len).asnumpy()
    model.hybridize(static_alloc=True)
    hybrid = model(src, src_len, tgt, tgt_len).asnumpy()
    np.testing.assert_allclose(hybrid, eager, atol=1e-5)


def test_padding_does_not_change_outputs():
    model = make_model()
    src, src_len, tgt, tgt_len = batch()
    logits = model(src, src_len, tgt, tgt_len).asnumpy()
    src2, tgt2 = src.copy(), tgt.copy()
    src2[1, 4:] = 9  # source padding of sentence 1
    src2[2, 2:] = 11
    tgt2[1, 3:] = 13  # target padding of sentence 1
    logits2 = model(src2, src_len, tgt2, tgt_len).asnumpy()
    for b, n in enumerate([6, 3, 5]):
        np.testing.assert_allclose(logits2[b, :n], logits[b, :n], atol=1e-5)


def test_dummy_rows_stay_finite_in_forward_and_backward():
    model = make_model()
    src, _, tgt, _ = batch()
    src_len, tgt_len = mx.nd.array([7, 1, 1]), mx.nd.array([6, 0, 0])  # rows 1 and 2 are padding rows
    with autograd.record():
        logits = model(src, src_len, tgt, tgt_len)
        loss = (mx.nd.log_softmax(logits, axis=-1) * mx.nd.SequenceMask(
            mx.nd.ones_like(logits), sequence_length=tgt_len, use_sequence_length=True, axis=1)).sum()
    loss.backward()
    assert np.isfinite(logits.asnumpy()).all()
    assert all(np.isfinite(p.grad().asnumpy()).all() for p in model.collect_params().values())


def test_parameter_names_are_deterministic_and_embeddings_tied():
    first, second = make_model(seed=1), make_model(seed=2)
    names = list(first.collect_params().keys())
    assert names == list(second.collect_params().keys())
    assert names[0] == "transformer_embed_weight"
    assert not any("proj" in n for n in names)  # output projection is the embedding
    untied = build_model("transformer", replace(TINY, tie_embeddings=False), VOCAB)
    assert "transformer_proj_weight" in untied.collect_params().keys()


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=f"unknown model 'gnmtt'; choose one of: {', '.join(sorted(MODELS))}$"):
        build_model("gnmtt", TINY, VOCAB)
    assert "transformer" in MODELS


def test_layer_norm_matches_gluon_layer_norm():
    ours, ref = LayerNorm(16, prefix="a_"), nn.LayerNorm(in_channels=16, prefix="b_")
    ours.initialize()
    ref.initialize()
    gamma, beta = mx.nd.random.normal(shape=(16,)), mx.nd.random.normal(shape=(16,))
    x, dy = mx.nd.random.normal(shape=(3, 5, 16)) * 3 + 1, mx.nd.random.normal(shape=(3, 5, 16))
    results = []
    for block in (ours, ref):
        block.gamma.set_data(gamma)
        block.beta.set_data(beta)
        block.hybridize(static_alloc=True)
        x.attach_grad()
        with autograd.record():
            y = block(x)
        y.backward(dy)
        results.append([y.asnumpy(), x.grad.asnumpy(), block.gamma.grad().asnumpy(), block.beta.grad().asnumpy()])
    for got, expected in zip(*results, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("transformer*.yaml")) + ["tiny"])
def test_presets_load_and_tiny_builds(preset):
    cfg = load_config(PRESETS / f"{preset}.yaml", ["train.max_updates=1"]).model
    assert cfg.arch == "transformer"
    if preset == "tiny":
        model = build_model(cfg.arch, cfg.transformer, VOCAB)
        model.initialize()
        src, src_len, tgt, tgt_len = batch()
        assert model(src, src_len, tgt, tgt_len).shape == (3, 6, VOCAB)


def forward_and_gradients(model, src, src_len, tgt, tgt_len):
    """Logits and every parameter's gradient of a token-sum loss."""
    params = model.collect_params()
    params.zero_grad()
    with autograd.record():
        logits = model(src, src_len, tgt, tgt_len)
        loss = (mx.nd.log_softmax(logits, axis=-1) * mx.nd.SequenceMask(
            mx.nd.ones_like(logits), sequence_length=tgt_len, use_sequence_length=True, axis=1)).sum()
    loss.backward()
    return logits.asnumpy(), {name: p.grad().asnumpy() for name, p in params.items()}


@pytest.mark.parametrize("pre_norm", [False, True])
def test_interleaved_attention_equals_batch_dot_in_values_and_gradients(pre_norm):
    hp = replace(TINY, pre_norm=pre_norm, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    plain, inter = make_model(hp, impl="batch_dot"), make_model(hp, impl="interleaved")
    names = list(plain.collect_params().keys())
    assert list(inter.collect_params().keys()) == names  # same names and shapes: checkpoints move freely
    assert all(inter.collect_params()[n].shape == plain.collect_params()[n].shape for n in names)
    # Random biases too, so a wrong row permutation of a packed projection's bias would show.
    rng = np.random.RandomState(3)
    for name in names:
        value = mx.nd.array(rng.randn(*plain.collect_params()[name].shape) * 0.2)
        plain.collect_params()[name].set_data(value)
        inter.collect_params()[name].set_data(value)
    expected_logits, expected_grads = forward_and_gradients(plain, *batch())
    logits, grads = forward_and_gradients(inter, *batch())
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=1e-4)
    for name in names:
        np.testing.assert_allclose(grads[name], expected_grads[name], atol=1e-4, rtol=1e-3, err_msg=name)


def test_checkpoint_moves_between_attention_impls(tmp_path):
    plain, inter = make_model(seed=1), make_model(seed=2, impl="interleaved")
    plain.save_parameters(str(tmp_path / "plain.params"))
    inter.load_parameters(str(tmp_path / "plain.params"))
    src, src_len, tgt, tgt_len = batch()
    np.testing.assert_allclose(inter(src, src_len, tgt, tgt_len).asnumpy(),
                               plain(src, src_len, tgt, tgt_len).asnumpy(), atol=1e-5)


def loss_curve(impl: str, num_updates: int = 20) -> list[float]:
    hp = replace(TINY, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = make_model(hp, impl=impl)
    model.collect_params().setattr("grad_req", "add")
    src, src_len, tgt, tgt_len = batch()
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    return adam_losses(model, (src, src_len, tgt_in, tgt_out, mx.nd.minimum(tgt_len, tgt_in.shape[1])), 3e-3,
                       num_updates)


def test_interleaved_and_batch_dot_train_the_same_loss_curve():
    plain, inter = loss_curve("batch_dot"), loss_curve("interleaved")
    assert inter[-1] < 0.7 * inter[0]  # it learns the batch
    np.testing.assert_allclose(inter, plain, rtol=2e-4)


def test_attention_impl_is_checked():
    with pytest.raises(ValueError, match="choose one of: batch_dot, fused, interleaved"):
        build_model("transformer", TINY, VOCAB, attention_impl="flash")
    with pytest.raises(ValueError, match="needs fused_ops=True"):
        build_model("transformer", TINY, VOCAB, attention_impl="fused")
