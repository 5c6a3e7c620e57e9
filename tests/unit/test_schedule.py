"""Inverse-sqrt schedule values checked by hand."""
import pytest

from dist_nmt.schedule import lr_at


def test_warmup_is_linear_and_peaks_at_lr():
    assert lr_at(1, 1e-3, 100, 0.0) == pytest.approx(1e-5)
    assert lr_at(50, 1e-3, 100, 0.0) == pytest.approx(5e-4)
    assert lr_at(100, 1e-3, 100, 0.0) == pytest.approx(1e-3)


def test_inverse_sqrt_decay():
    assert lr_at(400, 1e-3, 100) == pytest.approx(5e-4)  # sqrt(100/400) = 1/2
    assert lr_at(10000, 1e-3, 100) == pytest.approx(1e-4)


def test_no_warmup():
    assert lr_at(7, 3e-4, 0) == 3e-4
