"""Label-smoothed cross-entropy against a hand computation; padding is ignored."""
import math

import mxnet as mx
import numpy as np
import pytest

from dist_nmt.loss import label_smoothed_ce, label_smoothed_nll


def test_matches_hand_computation_and_ignores_padding():
    logits = mx.nd.array([[[0.0, math.log(3.0)], [5.0, -5.0]]])  # (B=1, T=2, V=2); position 1 is padding
    loss, nll = label_smoothed_nll(logits, mx.nd.array([[1, 0]]), mx.nd.array([1.0]), epsilon=0.2)
    p = np.array([0.25, 0.75])
    expected_nll = -math.log(p[1])
    expected = 0.8 * expected_nll + 0.2 * -np.log(p).mean()
    assert nll.asscalar() == pytest.approx(expected_nll, rel=1e-5)
    assert loss.asscalar() == pytest.approx(expected, rel=1e-5)


def test_dummy_rows_contribute_nothing():
    logits = mx.nd.random.normal(shape=(2, 3, 5))
    tgt = mx.nd.array([[1, 2, 3], [0, 0, 0]])
    full, _ = label_smoothed_nll(logits, tgt, mx.nd.array([3.0, 0.0]), 0.1)
    one, _ = label_smoothed_nll(logits[:1], tgt[:1], mx.nd.array([3.0]), 0.1)
    assert full.asscalar() == pytest.approx(one.asscalar(), rel=1e-5)


def _grads(fn, logits):
    logits = logits.copy()
    logits.attach_grad()
    with mx.autograd.record():
        out = fn(logits)
    out[0].backward()
    return [o.asnumpy() for o in out], logits.grad.asnumpy()


@pytest.mark.parametrize("scale", [1.0, 256.0])
def test_fused_training_loss_equals_label_smoothed_nll_in_value_and_gradient(scale):
    mx.random.seed(3)
    logits = mx.nd.random.normal(scale=3.0, shape=(3, 4, 7))
    tgt = mx.nd.array([[1, 2, 3, 4], [6, 0, 5, 0], [2, 2, 2, 2]], dtype="int32")  # ids as the trainer has them
    lengths = mx.nd.array([4.0, 3.0, 0.0])  # a padded row and an empty one
    (loss, nll), grad = _grads(lambda x: [s * scale for s in label_smoothed_nll(x, tgt, lengths, 0.1)], logits)
    (_, fused_loss, fused_nll), fused_grad = _grads(
        lambda x: label_smoothed_ce(x, tgt, lengths, 0.1, grad_scale=scale), logits)
    assert fused_loss * scale == pytest.approx(loss, rel=1e-5)
    assert fused_nll * scale == pytest.approx(nll, rel=1e-5)
    np.testing.assert_allclose(fused_grad, grad, rtol=1e-4, atol=1e-6 * scale)
    assert not fused_grad[1, 3:].any() and not fused_grad[2].any()  # padding gets no gradient


def test_fused_training_loss_propagates_a_non_finite_scale():
    logits = mx.nd.random.normal(shape=(1, 2, 5))
    _, grad = _grads(lambda x: label_smoothed_ce(x, mx.nd.array([[1, 2]]), mx.nd.array([2.0]), 0.1,
                                                 grad_scale=float("nan")), logits)
    assert np.isnan(grad).all()  # the trainer's skip-on-overflow check must see it
