"""Fused CPU ops (dist_nmt/ops): values and gradients equal the pure-MXNet path, masks are a pure function of the
seed, and a Transformer and a GNMT (additive attention) train and decode the same with model.fused_ops on and off."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

from dist_nmt import distributed, ops
from dist_nmt.config import load_config
from dist_nmt.data.batch import BatchPlan, collate
from dist_nmt.data.dataset import EncodedSplit
from dist_nmt.errors import ConfigError
from dist_nmt.loss import label_smoothed_nll
from dist_nmt.models import GNMTHParams, TransformerHParams, build_model
from dist_nmt.models import fused as fused_ops
from dist_nmt.models.attention import MLPAttention, attend
from dist_nmt.step import train_step
from dist_nmt.train import build_model_for, make_optimizer
from dist_nmt.validate import dev_loss
from support import ROOT

VOCAB = 50
TINY = TransformerHParams(num_enc_layers=2, num_dec_layers=2, d_model=32, d_ff=64, num_heads=4, dropout=0.0,
                          attention_dropout=0.0, activation_dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def library():
    """Build (if needed) and load the library; skip the module only when it cannot be built here."""
    try:
        ops.build()
    except RuntimeError as err:
        pytest.skip(f"fused ops library cannot be built: {err}")
    assert ops.load(), ops.unavailable_reason()


def run(fn, inputs, head_grad, hybridize=True, consts=()):
    """fn(F, *inputs, *consts) through a (hybridized) block: output and each input's gradient as numpy."""
    block = nn.HybridLambda(fn)
    if hybridize:
        block.hybridize(static_alloc=True)
    arrays = [x.copy() for x in inputs]
    for x in arrays:
        x.attach_grad()
    with autograd.record():
        out = block(*arrays, *consts)
    out.backward(head_grad)
    return out.asnumpy(), [x.grad.asnumpy() for x in arrays]


def assert_same(got, expected, atol=2e-5):
    np.testing.assert_allclose(got[0], expected[0], atol=atol, rtol=1e-4)
    for g, e in zip(got[1], expected[1], strict=True):
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 33), (1, 2, 3, 8)])
def test_add_dropout_norm_equals_layer_norm_of_sum(shape):
    rng = np.random.RandomState(sum(shape))
    x, h, g = (mx.nd.array(rng.randn(*shape) * 3 + 1) for _ in range(3))
    d = shape[-1]

    def ref(F, x, h):
        return F.LayerNorm(x + h, F.ones(shape=(d,)), F.zeros(shape=(d,)), axis=-1, eps=1e-5)

    expected = run(ref, [x, h], g, hybridize=False)
    assert_same(run(lambda F, x, h: fused_ops.add_dropout_norm(F, x, h, 0.0, 1e-5)[0], [x, h], g), expected)
    assert_same(run(lambda F, x, h: fused_ops.norm(F, x + h, 1e-5)[0], [x, h], g), expected)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_layer_norm_block_fused_equals_unfused_with_gamma_and_beta(pre_norm):
    from dist_nmt.models.transformer import LayerNorm

    norm = LayerNorm(16, prefix="n_")
    norm.initialize()
    norm.gamma.set_data(mx.nd.random.uniform(0.5, 1.5, shape=(16,)))
    norm.beta.set_data(mx.nd.random.normal(shape=(16,)))
    x, h, g = (mx.nd.random.normal(shape=(4, 3, 16)) for _ in range(3))
    grads = []
    for fused in (False, True):
        for p in norm.collect_params().values():
            p.grad_req = "add"  # as in training: a custom op must not be the one writing these
            p.zero_grad()
        with autograd.record():
            if pre_norm:
                y = norm.fused(mx.nd, x) if fused else norm(x)
            else:
                y = norm.fused(mx.nd, x, h, 0.0) if fused else norm(x + h)
        y.backward(g)
        grads.append([y.asnumpy(), norm.gamma.grad().asnumpy(), norm.beta.grad().asnumpy()])
    for got, expected in zip(grads[1], grads[0], strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(6, 4, 7, 8), (8, 9, 9, 16), (2, 1, 5, 4)])
def test_attention_equals_batch_dot_softmax(dims, causal):
    bh, t, s, d_k = dims
    rng = np.random.RandomState(bh + t)
    q, g = mx.nd.array(rng.randn(bh, t, d_k)), mx.nd.array(rng.randn(bh, t, d_k))
    k, v = mx.nd.array(rng.randn(bh, s, d_k)), mx.nd.array(rng.randn(bh, s, d_k))
    if causal:
        lengths = np.tile(np.arange(1, t + 1), (bh, 1))
    else:
        lengths = np.repeat(rng.randint(1, s + 1, size=(bh, 1)), t, axis=1)
        lengths[0] = s  # one full row
    lengths = mx.nd.array(lengths).astype("int32")

    def ref(F, q, k, v, lengths):
        return attend(F, q, k, v, lengths, 0.0, d_k)

    def fused(F, q, k, v, lengths):
        return attend(F, q, k, v, lengths, 0.0, d_k, fused=True)

    expected = run(ref, [q, k, v], g, hybridize=False, consts=[lengths])
    assert_same(run(fused, [q, k, v], g, consts=[lengths]), expected)


def add_dropout_run(seed: int, p: float = 0.3, train: bool = True):
    mx.random.seed(seed)
    x, h = mx.nd.ones((64, 128)), mx.nd.full((64, 128), 2.0)
    x.attach_grad()
    h.attach_grad()
    with autograd.record(train_mode=train):
        s = fused_ops.add_dropout(mx.nd, x, h, p)
    s.backward(mx.nd.ones_like(s))
    return s.asnumpy(), h.grad.asnumpy()


def test_dropout_mask_is_a_function_of_the_seed_and_regenerated_in_backward():
    s1, dh1 = add_dropout_run(seed=3)
    s2, dh2 = add_dropout_run(seed=3)
    s3, _ = add_dropout_run(seed=4)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(dh1, dh2)
    assert (s1 != s3).mean() > 0.2  # another seed, another mask
    kept = (s1 - 1.0) / 2.0  # dropout(h)/h: 0 or 1/(1-p)
    assert np.all(np.isclose(kept, 0.0) | np.isclose(kept, 1 / 0.7, rtol=1e-6))
    assert abs((kept == 0).mean() - 0.3) < 0.02
    np.testing.assert_allclose(dh1, kept, rtol=1e-6)  # backward regenerated the forward's mask


def test_no_dropout_at_inference():
    s, dh = add_dropout_run(seed=3, train=False)
    np.testing.assert_array_equal(s, 3.0)
    np.testing.assert_array_equal(dh, 1.0)


def test_attention_dropout_mask_matches_between_forward_and_backward():
    bh, t, s, d_k = 4, 5, 6, 8
    q, k = mx.nd.zeros((bh, t, d_k)), mx.nd.zeros((bh, s, d_k))  # uniform probabilities 1/s
    v = mx.nd.array(np.tile(np.eye(s, d_k), (bh, 1, 1)))  # context[:, :, j] = dropout(p)[:, :, j]
    lengths = mx.nd.full((bh, t), s).astype("int32")
    v.attach_grad()
    mx.random.seed(5)
    with autograd.record():
        ctx = fused_ops.attention(mx.nd, q, k, v, lengths, 0.5, d_k)
    ctx.backward(mx.nd.ones_like(ctx))
    dropped = ctx.asnumpy()[:, :, :s]  # (BH, T, S): 0 or 2/s
    assert np.all(np.isclose(dropped * s, 0.0) | np.isclose(dropped * s, 2.0, rtol=1e-5))
    assert 0.3 < (dropped == 0).mean() < 0.7
    # dv[s, j] = sum_t dropout(p)[t, s] for j == s under the identity layout
    np.testing.assert_allclose(np.diagonal(v.grad.asnumpy()[:, :s, :s], axis1=1, axis2=2), dropped.sum(axis=1),
                               rtol=1e-5)


def tiny_batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    src = mx.nd.array(rng.randint(4, VOCAB, size=(3, 7)))
    tgt = mx.nd.array(rng.randint(4, VOCAB, size=(3, 7)))
    return src, mx.nd.array([7, 4, 2]), tgt[:, :-1], tgt[:, 1:], mx.nd.array([6, 3, 5])


def make_model(hp, fused: bool, seed: int = 0):
    mx.random.seed(seed)
    model = build_model("transformer", hp, VOCAB, fused_ops=fused)
    model.initialize(mx.init.Xavier(magnitude=3))
    model.collect_params().setattr("grad_req", "add")
    model.hybridize(static_alloc=True)
    return model


def loss_curve(hp, fused: bool, num_updates: int = 20, seed: int = 0) -> list[float]:
    model = make_model(hp, fused, seed)
    return adam_losses(model, tiny_batch(), 3e-3, num_updates)


def adam_losses(model, batch, lr: float, num_updates: int) -> list[float]:
    """Label-smoothed loss of each of `num_updates` Adam steps on one batch (src, src_len, tgt_in, tgt_out, tgt_len)."""
    trainer = gluon.Trainer(model.collect_params(), "adam", {"learning_rate": lr})
    src, src_len, tgt_in, tgt_out, tgt_len = batch
    losses = []
    for _ in range(num_updates):
        with autograd.record():
            loss, _ = label_smoothed_nll(model(src, src_len, tgt_in, tgt_len), tgt_out, tgt_len, 0.1)
        loss.backward()
        trainer.step(float(tgt_len.sum().asscalar()))
        model.collect_params().zero_grad()
        losses.append(float(loss.asscalar()))
    return losses


@pytest.mark.parametrize("pre_norm", [False, True])
def test_fused_on_and_off_train_the_same_loss_curve(pre_norm):
    hp = replace(TINY, pre_norm=pre_norm)
    off, on = loss_curve(hp, fused=False), loss_curve(hp, fused=True)
    assert on[-1] < 0.7 * on[0]  # it learns the batch
    np.testing.assert_allclose(on, off, rtol=2e-4)


def test_fused_dropout_training_is_deterministic_for_a_seed():
    hp = replace(TINY, dropout=0.2, attention_dropout=0.1)
    first, again = loss_curve(hp, fused=True, num_updates=5), loss_curve(hp, fused=True, num_updates=5)
    assert first == again  # masks are a pure function of the mx.random seed
    assert loss_curve(hp, fused=True, num_updates=5, seed=1) != first


@pytest.mark.parametrize("pre_norm", [False, True])
def test_fused_model_forward_equals_unfused_and_incremental_decoding(pre_norm):
    hp = replace(TINY, pre_norm=pre_norm, dropout=0.1, attention_dropout=0.1)
    fused, plain = make_model(hp, True), make_model(hp, False)
    names = list(plain.collect_params().keys())
    assert list(fused.collect_params().keys()) == names  # checkpoints stay compatible
    src, src_len, tgt_in, _, _ = tiny_batch()
    full_len = mx.nd.full((3,), tgt_in.shape[1])
    logits = fused(src, src_len, tgt_in, full_len)  # inference: no dropout on either path
    np.testing.assert_allclose(logits.asnumpy(), plain(src, src_len, tgt_in, full_len).asnumpy(), atol=2e-5)
    states = fused.init_decode_states(fused.encode(src, src_len))
    steps = []
    for t in range(tgt_in.shape[1]):
        log_probs, states, _ = fused.decode_step(tgt_in[:, t], states)
        steps.append(log_probs)
    np.testing.assert_allclose(mx.nd.stack(*steps, axis=1).asnumpy(),
                               mx.nd.log_softmax(logits, axis=-1).asnumpy(), atol=2e-5)


def test_resolve_modes():
    assert ops.resolve("off") is False
    assert ops.resolve("auto") is True and ops.resolve("on") is True
    assert ops.resolve("auto", on_gpu=True) is False
    with pytest.raises(ConfigError, match="CPU-only"):
        ops.resolve("on", on_gpu=True)
    with pytest.raises(ValueError, match="choose one of: auto, on, off"):
        ops.resolve("fast")
    assert ops.is_current()


def test_resolve_attention_modes():
    assert ops.resolve_attention("auto", fused=True) == "fused"
    assert ops.resolve_attention("auto", fused=False) == "batch_dot"
    assert ops.resolve_attention("auto", fused=False, on_gpu=True) == "interleaved"
    assert ops.resolve_attention("interleaved", fused=True) == "interleaved"
    assert ops.resolve_attention("batch_dot", fused=True) == "batch_dot"
    with pytest.raises(ConfigError, match="set model.fused_ops=auto or on"):
        ops.resolve_attention("fused", fused=False)
    with pytest.raises(ConfigError, match="interleaved on GPU"):
        ops.resolve_attention("fused", fused=False, on_gpu=True)
    with pytest.raises(ConfigError, match="fp32-only on CPU"):
        ops.resolve_attention("interleaved", fused=True, dtype="bf16")
    assert ops.resolve_attention("interleaved", fused=False, on_gpu=True, dtype="fp16") == "interleaved"
    with pytest.raises(ValueError, match="choose one of: auto, batch_dot, fused, interleaved"):
        ops.resolve_attention("flash", fused=True)


@pytest.mark.parametrize("impl", ["batch_dot", "interleaved"])
def test_fused_layer_norm_with_other_attention_equals_plain_model(impl):
    """fused_ops (residual + LayerNorm) combine with every attention implementation."""
    hp = replace(TINY, pre_norm=True)
    mx.random.seed(0)
    fused = build_model("transformer", hp, VOCAB, fused_ops=True, attention_impl=impl)
    fused.initialize(mx.init.Xavier(magnitude=3))
    fused.hybridize(static_alloc=True)
    plain = make_model(hp, False)
    plain.collect_params().zero_grad()
    for name, param in fused.collect_params().items():
        param.set_data(plain.collect_params()[name].data())
    src, src_len, tgt_in, _, tgt_len = tiny_batch()
    np.testing.assert_allclose(fused(src, src_len, tgt_in, tgt_len).asnumpy(),
                               plain(src, src_len, tgt_in, tgt_len).asnumpy(), atol=2e-5)



@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_fused_loss_equals_label_smoothed_nll(epsilon):
    from dist_nmt.loss import fused_label_smoothed_nll

    rng = np.random.RandomState(7)
    logits = mx.nd.array(rng.randn(3, 6, 301) * 4)
    tgt_out = mx.nd.array(rng.randint(0, 301, size=(3, 6)))
    tgt_len = mx.nd.array([6, 2, 4])
    results = []
    for loss_fn in (label_smoothed_nll, fused_label_smoothed_nll):
        x = logits.copy()
        x.attach_grad()
        with autograd.record():
            loss, nll = loss_fn(x, tgt_out, tgt_len, epsilon)
            total = loss + 0.5 * nll  # both outputs carry gradient
        total.backward()
        results.append((loss.asscalar(), nll.asscalar(), x.grad.asnumpy()))
    (loss, nll, grad), (loss_ref, nll_ref, grad_ref) = results[1], results[0]
    np.testing.assert_allclose([loss, nll], [loss_ref, nll_ref], rtol=1e-5)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6, rtol=1e-4)
    assert np.all(grad[1, 2:] == 0)  # padded positions get no gradient


def random_split(num_sentences: int = 12, seed: int = 0) -> EncodedSplit:
    """Sentences of 1..7 random subwords on each side."""
    rng = np.random.RandomState(seed)

    def side():
        sentences = [rng.randint(4, VOCAB, size=n) for n in rng.randint(1, 8, size=num_sentences)]
        return np.concatenate(sentences).astype(np.int16), np.cumsum([0] + [len(x) for x in sentences])

    return EncodedSplit(*side(), *side(), name="random")


def trainer_run(model_fused_ops: str, fused_loss: bool, dropout: float, num_updates: int = 20):
    """The trainer's own model, optimizer (clipping at 1.0) and step over padded batches with a dummy row:
    (per-token loss of every update, its gradient norms, dev loss values, parameters after training)."""
    distributed.init_world()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "model.transformer.d_model=32", "model.transformer.d_ff=64", "model.transformer.num_enc_layers=1",
        "model.transformer.num_dec_layers=1", f"model.transformer.dropout={dropout}", "optim.lr=3e-3",
        f"model.fused_ops={model_fused_ops}"])
    model = build_model_for(cfg, VOCAB, mx.cpu())
    trainer = make_optimizer(cfg, model)
    split = random_split()
    plans = [BatchPlan(np.arange(i, i + 4), src_pad_len=9, tgt_pad_len=9, bucket=0, num_rows=5) for i in (0, 4, 8)]
    losses, norms = [], []
    for update in range(num_updates):
        mx.random.seed(update)  # the same dropout masks on both loss paths
        batch = collate(split, plans[update % 2])
        stats = train_step(model, trainer, [batch], mx.cpu(), 1.0, cfg.optim, batch.num_tgt_tokens, fused_loss)
        losses.append(stats.loss_sum / batch.num_tgt_tokens)
        norms.append(stats.grad_norm)
    dev = dev_loss(model, split, plans[2:], cfg.optim.label_smoothing, mx.cpu(), "dev", fused_loss=fused_loss)
    return losses, norms, dev, {k: v.data().asnumpy() for k, v in model.collect_params().items()}


def assert_same_training(got, expected, rtol: float) -> None:
    (losses, norms, dev, params), (losses_ref, norms_ref, dev_ref, params_ref) = got, expected
    assert losses_ref[-1] < 0.7 * losses_ref[0]  # it learns, so the curves say something
    np.testing.assert_allclose(losses, losses_ref, rtol=rtol)
    np.testing.assert_allclose(norms, norms_ref, rtol=rtol)
    np.testing.assert_allclose([dev["loss"], dev["ppl"]], [dev_ref["loss"], dev_ref["ppl"]], rtol=rtol)
    for name, value in params_ref.items():
        got_value = params[name]
        if name.endswith("kv_bias"):  # keys' bias: softmax is shift-invariant, so its true gradient is 0 and Adam
            d = value.shape[0] // (3 if name.endswith("qkv_bias") else 2)  # turns rounding noise into lr-sized steps
            keys = slice(d, 2 * d) if name.endswith("qkv_bias") else slice(0, d)
            got_value, value = np.delete(got_value, keys), np.delete(value, keys)
        np.testing.assert_allclose(got_value, value, atol=20 * rtol, err_msg=name)


def test_trainer_with_the_fused_loss_trains_and_validates_like_the_pure_loss():
    """Same model graph (with dropout), only the loss differs: logged loss, gradient norms, dev loss, weights."""
    fused = trainer_run("off", fused_loss=True, dropout=0.1)
    pure = trainer_run("off", fused_loss=False, dropout=0.1)
    assert fused[0][0] == pytest.approx(pure[0][0], rel=1e-6)  # the first update's loss: no drift yet
    assert_same_training(fused, pure, rtol=1e-4)


def test_trainer_with_fused_ops_on_and_off_trains_the_same():
    """model.fused_ops=on (fused model and loss) against off (pure MXNet throughout), through train_step."""
    assert_same_training(trainer_run("on", True, dropout=0.0), trainer_run("off", False, dropout=0.0), rtol=2e-4)


def test_library_loads_after_horovod_was_imported():
    """Horovod's MXNet extension carries its own lib_api symbols; the library must not bind to them."""
    code = "import horovod.mxnet\nfrom dist_nmt import ops\nassert ops.load(), ops.unavailable_reason()\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr[-2000:]


# Additive (GNMT) attention: dn_additive_score against the (B, T, S, A) built-in reference.

def additive_reference(F, q, k, v):
    """vᵀ tanh(q_t + k_s) through the pure-MXNet path of MLPAttention: q (B, T, A), k (B, S, A), v (A,)."""
    return F.reshape(MLPAttention._score(F, q, k, F.reshape(v, shape=(1, -1))), shape=(0, 0, -1))  # (B, T, S)


@pytest.mark.parametrize("dims,scale", [((3, 4, 5, 16), 1.0), ((2, 1, 7, 13), 1.0), ((5, 6, 3, 40), 6.0),
                                        ((1, 9, 9, 8), 0.01)])
def test_additive_score_values_and_gradients_equal_the_4d_reference(dims, scale):
    b, t, s, a = dims
    rng = np.random.RandomState(b * 100 + a)
    q, k = mx.nd.array(rng.randn(b, t, a) * scale), mx.nd.array(rng.randn(b, s, a) * scale)  # scale 6: saturated
    v, g = mx.nd.array(rng.randn(a)), rng.randn(b, t, s)
    g[0, :, s // 2 + 1:] = 0.0  # a length-masked row: the softmax sends exactly 0 to padded keys
    g = mx.nd.array(g)
    expected = run(additive_reference, [q, k, v], g, hybridize=False)
    assert_same(run(fused_ops.additive_score, [q, k, v], g), expected, atol=1e-5 * max(1.0, scale * a ** 0.5))


def test_additive_score_gradients_with_two_openmp_threads():
    """The per-thread dv sums and per-row dk ownership, with an odd batch split over two threads."""
    code = """
import mxnet as mx, numpy as np
from mxnet import autograd
from dist_nmt import ops
from dist_nmt.models import fused
assert ops.load(), ops.unavailable_reason()
rng = np.random.RandomState(0)
q, k, v = (mx.nd.array(rng.randn(*shape)) for shape in ((7, 5, 24), (7, 6, 24), (24,)))
g = mx.nd.array(rng.randn(7, 5, 6))
grads = []
for fn in (fused.additive_score, lambda F, q, k, v: F.sum(F.broadcast_mul(F.tanh(
        F.expand_dims(q, 2) + F.expand_dims(k, 1)), F.reshape(v, shape=(1, 1, 1, -1))), axis=-1)):
    xs = [x.copy() for x in (q, k, v)]
    for x in xs:
        x.attach_grad()
    with autograd.record():
        out = fn(mx.nd, *xs)
    out.backward(g)
    grads.append([out.asnumpy()] + [x.grad.asnumpy() for x in xs])
for got, expected in zip(*grads):
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def attention_block(normalized: bool, fused: bool, units: int) -> MLPAttention:
    mx.random.seed(3)
    block = MLPAttention(units, normalized, prefix="att_", fused=fused)
    block.initialize(mx.init.Xavier(magnitude=3))
    if normalized:
        block.g.set_data(mx.nd.array([0.7]))  # away from its 1/√A init, so that g's own gradient matters
    block.query_proj.bias.set_data(mx.nd.random.normal(shape=(units,)))
    block.collect_params().setattr("grad_req", "add")  # as in training: a custom op must not write these
    block.hybridize(static_alloc=True)
    return block


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("dims", [(4, 5, 6, 12), (3, 1, 8, 16), (2, 7, 3, 9)])
def test_mlp_attention_block_fused_equals_unfused_with_parameter_gradients(dims, normalized):
    b, t, s, a = dims
    rng = np.random.RandomState(sum(dims))
    query, keys, values = (mx.nd.array(rng.randn(*shape)) for shape in ((b, t, a), (b, s, a), (b, s, a)))
    src_len = rng.randint(1, s + 1, size=b)
    src_len[0], src_len[-1] = s, 0  # a full row and a dummy row (length 0, clipped to 1)
    lengths = mx.nd.array(np.repeat(src_len[:, None], t, axis=1))  # (B, T)
    head_ctx, head_probs = mx.nd.array(rng.randn(b, t, a)), mx.nd.array(rng.randn(b, t, s))
    results = []
    for fused in (False, True):
        block = attention_block(normalized, fused, a)
        inputs = [x.copy() for x in (query, keys, values)]
        for x in inputs:  # 'write': in the model these are outputs of other ops, not leaves
            x.attach_grad()
        for _ in range(2):  # parameters accumulate two passes: an overwrite instead of an add shows as 1x vs 2x
            with autograd.record():
                ctx, probs = block(*inputs, lengths)
                total = (ctx * head_ctx).sum() + (probs * head_probs).sum()
            total.backward()
        params = sorted(block.collect_params().items())
        results.append([ctx.asnumpy(), probs.asnumpy()] + [x.grad.asnumpy() for x in inputs]
                       + [p.grad().asnumpy() for _, p in params])
    names = ["ctx", "probs", "d_query", "d_keys", "d_values"] + [name for name, _ in params]
    assert ("att_g" in names) == normalized
    for name, got, expected in zip(names, results[1], results[0], strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4, err_msg=name)
    assert np.all(results[1][1][b - 1, :, 1:] == 0)  # the dummy row attends to its one clipped key only


GNMT_TINY = GNMTHParams(num_enc_layers=2, num_dec_layers=2, hidden_size=16, embed_size=16, num_bi_layers=1,
                        residual_from_layer=2, dropout=0.0, tie_embeddings=True)


def make_gnmt(attention: str, fused: bool, hybridize: bool = True, seed: int = 0, **overrides):
    mx.random.seed(seed)
    model = build_model("gnmt", replace(GNMT_TINY, attention=attention, **overrides), VOCAB, fused_ops=fused)
    model.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0))
    model.collect_params().setattr("grad_req", "add")
    if hybridize:
        model.hybridize(static_alloc=True)
    return model


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("attention", ["mlp", "normed_mlp"])
def test_fused_gnmt_decodes_like_it_trains_and_like_the_unfused_model(attention, hybridize, caplog):
    caplog.set_level("INFO", logger="dist_nmt.models.gnmt")
    fused = make_gnmt(attention, True, hybridize, decoder_init="encoder")
    assert "fused score op dn_additive_score" in caplog.text
    plain = make_gnmt(attention, False, hybridize, decoder_init="encoder")
    assert "pure-MXNet score" in caplog.text
    assert list(fused.collect_params().keys()) == list(plain.collect_params().keys())  # same checkpoints
    src, src_len, tgt_in, _, tgt_len = tiny_batch()
    logits = fused(src, src_len, tgt_in, tgt_len)
    np.testing.assert_allclose(logits.asnumpy(), plain(src, src_len, tgt_in, tgt_len).asnumpy(), atol=2e-5)
    states = fused.init_decode_states(fused.encode(src, src_len))
    steps = []
    for t in range(tgt_in.shape[1]):
        log_probs, states, _ = fused.decode_step(tgt_in[:, t], states)
        steps.append(log_probs)
    inc, ref = mx.nd.stack(*steps, axis=1).asnumpy(), mx.nd.log_softmax(logits, axis=-1).asnumpy()
    for row, length in enumerate(tgt_len.asnumpy().astype(int)):
        np.testing.assert_allclose(inc[row, :length], ref[row, :length], atol=1e-5)


def gnmt_loss_curve(attention: str, fused: bool, num_updates: int = 12) -> tuple[list[float], dict]:
    """Losses of `num_updates` Adam steps on one batch, and the attention parameters after them."""
    model = make_gnmt(attention, fused, dropout=0.0)
    losses = adam_losses(model, tiny_batch(), 1e-2, num_updates)
    return losses, {name: p.data().asnumpy() for name, p in model.collect_params(".*att.*").items()}


@pytest.mark.parametrize("attention", ["mlp", "normed_mlp"])
def test_fused_and_unfused_gnmt_train_the_same_loss_curve(attention):
    (off, off_params), (on, on_params) = gnmt_loss_curve(attention, fused=False), gnmt_loss_curve(attention, True)
    assert on[-1] < 0.8 * on[0]  # it learns the batch
    np.testing.assert_allclose(on, off, rtol=2e-4)
    initial = make_gnmt(attention, fused=True).collect_params()
    for name, value in off_params.items():  # Adam moves even small attention gradients by ~lr per step
        assert np.abs(value - initial[name].data().asnumpy()).max() > 1e-3, name
        np.testing.assert_allclose(on_params[name], value, atol=1e-4, err_msg=name)
