"""Label-smoothed cross-entropy against a hand computation; padding is ignored."""
import math

import mxnet as mx
import numpy as np
import pytest

from dist_nmt.loss import label_smoothed_nll


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
