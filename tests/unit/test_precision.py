"""Loss-scaler state machine and precision checks."""
import pytest

from dist_nmt.precision import LossScaler, PrecisionError, check_precision


def test_grows_after_interval_of_clean_updates():
    s = LossScaler(scale=8.0, growth_interval=3)
    assert [s.update(True) for _ in range(3)] == [False, False, False]
    assert s.scale == 16.0 and s.clean_updates == 0


def test_overflow_skips_and_backs_off_and_resets_growth():
    s = LossScaler(scale=8.0, growth_interval=3)
    s.update(True)
    s.update(True)
    assert s.update(False) is True
    assert s.scale == 4.0 and s.clean_updates == 0 and s.num_overflows == 1
    s.update(True)
    s.update(True)
    assert s.scale == 4.0  # interval restarted after the overflow


def test_minimum_scale_aborts_with_clear_message():
    s = LossScaler(scale=2.0, min_scale=1.0)
    s.update(False)  # 1.0: still allowed
    with pytest.raises(PrecisionError, match="minimum loss scale 1.0 reached"):
        s.update(False)


def test_state_round_trip():
    s = LossScaler(scale=64.0, growth_interval=5)
    s.update(False)
    s.update(True)
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == {"scale": 32.0, "clean_updates": 1, "num_overflows": 1}


def test_disabled_scaler_keeps_scale_one_but_still_skips():
    s = LossScaler(enabled=False)
    assert s.scale == 1.0
    assert s.update(False) is True and s.scale == 1.0


def test_fp16_on_cpu_refused_naming_alternative():
    with pytest.raises(PrecisionError, match="precision.dtype=bf16 or fp32"):
        check_precision("fp16", on_gpu=False)
    check_precision("fp16", on_gpu=True)
    check_precision("fp32", on_gpu=False)


def test_bf16_on_gpu_refused_and_fp16_without_scaling_warns(caplog):
    with pytest.raises(PrecisionError, match="bf16 is CPU-only.*precision.dtype=fp16"):
        check_precision("bf16", on_gpu=True)
    check_precision("bf16", on_gpu=False)
    check_precision("fp16", on_gpu=True, loss_scaling="none")
    assert "precision.loss_scaling=dynamic" in caplog.text


def test_token_sum_loss_starts_at_2_pow_7_and_overflow_skips_are_backoff_not_bad_updates():
    from dist_nmt.config import PrecisionConfig

    assert PrecisionConfig().init_scale == LossScaler().scale == 2.0**7
    s = LossScaler(scale=8.0, min_scale=1.0)
    backing_off = []
    for _ in range(4):  # 8 -> 4 -> 2 -> 1 -> 0.5 (below min_scale: fatal, with its own message)
        try:
            s.update(False)
        except PrecisionError:
            break
        backing_off.append(s.backing_off)
    assert backing_off == [True, True, True]
    assert LossScaler(enabled=False).backing_off is False  # without a scaler every skip is a bad update
