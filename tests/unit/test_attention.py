"""Attention primitives against a plain numpy reference; GNMT attention variants against each other."""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from dist_nmt.models.attention import (
    CrossAttention,
    LuongAttention,
    MLPAttention,
    SelfAttention,
    attend,
    gnmt_attention,
    head_lengths,
    merge_heads,
    split_heads,
)


def numpy_attention(q, k, v, lengths):
    """q (N, T, d), k/v (N, S, d), lengths (N, T): softmax over the first `length` keys."""
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    mask = np.arange(k.shape[1])[None, None, :] < lengths[:, :, None]
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def test_split_then_merge_heads_round_trips_and_splits_parts():
    x = mx.nd.random.normal(shape=(2, 5, 3 * 8))  # B=2, T=5, three parts of D=8, H=2
    q, k, v = split_heads(mx.nd, x, num_heads=2, num_parts=3, d_k=4)
    assert q.shape == (4, 5, 4)
    expected_k = x.asnumpy()[:, :, 8:16].reshape(2, 5, 2, 4).transpose(0, 2, 1, 3).reshape(4, 5, 4)
    np.testing.assert_array_equal(k.asnumpy(), expected_k)
    np.testing.assert_array_equal(merge_heads(mx.nd, v, num_heads=2).asnumpy(), x.asnumpy()[:, :, 16:])


def test_head_lengths_repeat_per_head_and_clip_zero_to_one():
    lengths = head_lengths(mx.nd, mx.nd.array([[3, 3], [0, 0]]), num_heads=2)
    assert lengths.dtype == np.int32
    assert lengths.asnumpy().tolist() == [[3, 3], [3, 3], [1, 1], [1, 1]]


def test_attend_masks_keys_beyond_valid_length():
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(4, 3, 8).astype(np.float32) for _ in range(3))
    lengths = np.array([[5, 5, 5], [2, 2, 2], [1, 2, 3], [5, 1, 4]])
    k5, v5 = np.concatenate([k, k[:, :2]], 1), np.concatenate([v, v[:, :2] * 100], 1)  # S=5
    got = attend(mx.nd, mx.nd.array(q), mx.nd.array(k5), mx.nd.array(v5), mx.nd.array(lengths, dtype="int32"),
                 dropout=0.0, d_k=8)
    np.testing.assert_allclose(got.asnumpy(), numpy_attention(q, k5, v5, lengths), atol=1e-5)


def test_self_attention_step_with_cache_equals_causal_attention():
    mx.random.seed(0)
    attn = SelfAttention(d_model=8, num_heads=2, attention_dropout=0.0, prefix="att_")
    attn.initialize()
    x = mx.nd.random.normal(shape=(3, 4, 8))  # B=3, T=4
    causal = head_lengths(mx.nd, mx.nd.array(np.tile(np.arange(1, 5), (3, 1))), num_heads=2)
    full = attn(x, causal).asnumpy()
    k_cache = v_cache = mx.nd.zeros((6, 1, 4))  # (B*H, 1 dummy slot, d_k)
    for t in range(4):
        step_lengths = mx.nd.full((6, 1), t + 1, dtype="int32")
        out, k_cache, v_cache = attn.step(mx.nd, x[:, t], k_cache, v_cache, step_lengths)
        np.testing.assert_allclose(out.asnumpy(), full[:, t], atol=1e-5)
    assert k_cache.shape == (6, 5, 4)  # 4 steps + the masked dummy slot


def _gnmt_inputs(seed: int = 0, b: int = 3, t: int = 5, s: int = 6, h: int = 16):
    rng = np.random.RandomState(seed)
    query, keys, values = (mx.nd.array(rng.randn(b, n, h)) for n in (t, s, s))
    lengths = mx.nd.array(np.repeat([[6], [3], [0]], t, axis=1))  # full, padded, dummy row
    return query, keys, values, lengths


def _run_with_grads(block, inputs):
    for x in inputs[:3]:
        x.attach_grad()
    with mx.autograd.record():
        ctx, probs = block(*inputs)
        loss = (ctx * ctx).sum() + (probs * mx.nd.arange(probs.shape[-1])).sum()
    loss.backward()
    grads = [x.grad.asnumpy() for x in inputs[:3]] + [p.grad().asnumpy() for p in block.collect_params().values()]
    return ctx.asnumpy(), probs.asnumpy(), grads


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("hybridize", [False, True])
def test_chunked_additive_score_has_the_same_values_and_gradients(normalized, hybridize):
    results = []
    for chunk in (0, 4, 5):  # 5 leaves a narrower last slice (16 = 5 + 5 + 5 + 1)
        mx.random.seed(1)
        block = MLPAttention(16, normalized, chunk_units=chunk, prefix="att_")
        block.initialize(mx.init.Uniform(0.5))
        if hybridize:
            block.hybridize(static_alloc=True)
        results.append(_run_with_grads(block, _gnmt_inputs()))
    for ctx, probs, grads in results[1:]:
        np.testing.assert_allclose(ctx, results[0][0], atol=1e-5)
        np.testing.assert_allclose(probs, results[0][1], atol=1e-6)
        for got, want in zip(grads, results[0][2], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scaled", [True, False])
def test_luong_matches_numpy_and_masks_padding(scaled):
    mx.random.seed(2)
    block = LuongAttention(16, scaled=scaled, prefix="att_")
    block.initialize()
    query, keys, values, lengths = _gnmt_inputs()
    ctx, probs = block(query, keys, values, lengths)
    w = block.query_proj.weight.data().asnumpy()
    q = query.asnumpy() @ w.T  # (B, T, A)
    valid = np.maximum(lengths.asnumpy(), 1)  # a dummy row attends to its first key
    q = q if scaled else q * math.sqrt(16)  # numpy_attention divides the scores by √A, as scaled_luong does
    expected = numpy_attention(q, keys.asnumpy(), values.asnumpy(), valid)
    np.testing.assert_allclose(ctx.asnumpy(), expected, atol=1e-5)
    assert np.all(probs.asnumpy()[1, :, 3:] == 0)
    np.testing.assert_allclose(probs.asnumpy().sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "normed_mlp", "luong", "scaled_luong"])
def test_one_query_at_a_time_equals_all_queries(kind):
    block = gnmt_attention(kind, 16, chunk_units=8, prefix="att_")
    block.initialize(mx.init.Uniform(0.5))
    block.hybridize(static_alloc=True)
    query, keys, values, lengths = _gnmt_inputs()
    ctx, probs = block(query, keys, values, lengths)
    for t in range(query.shape[1]):
        ctx_t, probs_t = block(query[:, t:t + 1], keys, values, lengths[:, t:t + 1])
        np.testing.assert_allclose(ctx_t.asnumpy()[:, 0], ctx.asnumpy()[:, t], atol=1e-5)
        np.testing.assert_allclose(probs_t.asnumpy()[:, 0], probs.asnumpy()[:, t], atol=1e-6)
    with pytest.raises(ValueError, match="choose one of: mlp, normed_mlp, luong, scaled_luong"):
        gnmt_attention("dot", 16)


def run_block(block, inputs, lengths, head_grad, time_major: bool):
    """block(*inputs, lengths) hybridized: output (B, T, D) and the gradients of every input and parameter.

    Inputs are batch-major (B, T, D); a time-major block gets them transposed and its output transposed back."""
    block.hybridize(static_alloc=True)
    arrays = [x.transpose((1, 0, 2)) if time_major else x.copy() for x in inputs]
    for x in arrays:
        x.attach_grad()
    params = block.collect_params()
    params.zero_grad()
    with autograd.record():
        out = block(*arrays, lengths)
        out = out.transpose((1, 0, 2)) if time_major else out
    out.backward(head_grad)
    grads = [x.grad.transpose((1, 0, 2)) if time_major else x.grad for x in arrays]
    return out.asnumpy(), [g.asnumpy() for g in grads], {n: p.grad().asnumpy() for n, p in params.items()}


def interleaved_and_batch_dot(cls, seed: int, inputs, lengths):
    """The same block (same parameters, random biases) on the batch_dot and interleaved paths."""
    mx.random.seed(seed)
    results = []
    for impl in ("batch_dot", "interleaved"):
        block = cls(d_model=24, num_heads=3, attention_dropout=0.0, prefix="att_", impl=impl)
        block.initialize()
        if impl == "batch_dot":
            values = {n: mx.nd.random.normal(scale=0.3, shape=p.shape) for n, p in block.collect_params().items()}
        for name, param in block.collect_params().items():
            param.set_data(values[name])
        head_grad = mx.nd.array(np.random.RandomState(seed).randn(*inputs[0].shape))
        results.append(run_block(block, inputs, lengths, head_grad, time_major=impl == "interleaved"))
    return results


def assert_same_values_and_gradients(got, expected):
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4, rtol=1e-4)
    for g, e in zip(got[1], expected[1], strict=True):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        np.testing.assert_allclose(got[2][name], expected[2][name], atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch, t", [(2, 5), (4, 9), (1, 3)])
def test_interleaved_self_attention_equals_batch_dot(batch, t, causal):
    rng = np.random.RandomState(batch * t)
    x = mx.nd.array(rng.randn(batch, t, 24))
    if causal:
        per_row = np.tile(np.arange(1, t + 1), (batch, 1))
    else:
        per_row = np.repeat(rng.randint(1, t + 1, size=(batch, 1)), t, axis=1)
        per_row[0] = t
    lengths = head_lengths(mx.nd, mx.nd.array(per_row), num_heads=3)  # (B*H, T)
    expected, got = interleaved_and_batch_dot(SelfAttention, batch + t, [x], lengths)
    assert_same_values_and_gradients(got, expected)


@pytest.mark.parametrize("batch, t, s", [(2, 4, 7), (3, 6, 2), (1, 1, 5)])
def test_interleaved_cross_attention_equals_batch_dot(batch, t, s):
    rng = np.random.RandomState(batch + t + s)
    x, mem = mx.nd.array(rng.randn(batch, t, 24)), mx.nd.array(rng.randn(batch, s, 24))
    src_len = rng.randint(1, s + 1, size=(batch, 1))
    src_len[0] = s
    lengths = head_lengths(mx.nd, mx.nd.array(np.repeat(src_len, t, axis=1)), num_heads=3)  # (B*H, T)
    expected, got = interleaved_and_batch_dot(CrossAttention, batch * s, [x, mem], lengths)
    assert_same_values_and_gradients(got, expected)
    for b, n in enumerate(src_len[:, 0]):  # source padding gets no gradient through attention on either path
        np.testing.assert_array_equal(got[1][1][b, n:], 0)
