"""Attention primitives against a plain numpy reference."""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np

from dist_nmt.models.attention import SelfAttention, attend, head_lengths, merge_heads, split_heads


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
