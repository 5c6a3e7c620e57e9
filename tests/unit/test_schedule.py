"""Learning-rate schedules: values checked by hand."""
import itertools

import pytest

from dist_nmt.config import ConfigError, OptimConfig, load_config
from dist_nmt.schedule import lr_at


def optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1e-3, "warmup_updates": 100, "warmup_init_lr": 0.0, **kw})


def test_warmup_is_linear_and_peaks_at_lr():
    for schedule in ("inverse_sqrt", "constant", "step_decay"):
        cfg = optim(schedule=schedule, decay_start_updates=50)  # the warmup wins over a decay inside it
        assert lr_at(1, cfg) == pytest.approx(1e-5)
        assert lr_at(50, cfg) == pytest.approx(5e-4)
        assert lr_at(100, cfg) == pytest.approx(1e-3)


def test_inverse_sqrt_decay_is_the_default():
    assert OptimConfig().schedule == "inverse_sqrt"
    assert lr_at(400, optim()) == pytest.approx(5e-4)  # sqrt(100/400) = 1/2
    assert lr_at(10000, optim()) == pytest.approx(1e-4)


def test_no_warmup():
    assert lr_at(7, optim(lr=3e-4, warmup_updates=0)) == 3e-4
    assert lr_at(0, optim(lr=3e-4, warmup_updates=0, schedule="constant")) == 3e-4


def test_constant_stays_at_lr():
    assert lr_at(101, optim(schedule="constant")) == 1e-3
    assert lr_at(10**6, optim(schedule="constant")) == 1e-3


def test_step_decay_halves_from_the_start_update_then_every_interval():
    cfg = optim(schedule="step_decay", decay_start_updates=500, decay_every_updates=100, decay_factor=0.5)
    assert lr_at(499, cfg) == 1e-3
    assert lr_at(500, cfg) == pytest.approx(5e-4)
    assert lr_at(599, cfg) == pytest.approx(5e-4)
    assert lr_at(600, cfg) == pytest.approx(2.5e-4)
    assert lr_at(750, cfg) == pytest.approx(1.25e-4)


def test_step_decay_once_without_interval_and_never_without_start():
    once = optim(schedule="step_decay", decay_start_updates=500, decay_factor=0.1)
    assert lr_at(499, once) == 1e-3
    assert lr_at(500, once) == pytest.approx(1e-4)
    assert lr_at(10**6, once) == pytest.approx(1e-4)
    assert lr_at(10**6, optim(schedule="step_decay")) == 1e-3


def test_config_rejects_unknown_schedule_and_bad_factor():
    assert load_config(None, ["train.max_updates=1", "optim.schedule=step_decay"]).optim.schedule == "step_decay"
    with pytest.raises(ConfigError, match="optim.schedule.*inverse_sqrt"):
        load_config(None, ["train.max_updates=1", "optim.schedule=cosine"])
    with pytest.raises(ConfigError, match="optim.decay_factor"):
        load_config(None, ["train.max_updates=1", "optim.decay_factor=2"])


def test_cooldown_falls_linearly_from_the_schedule_to_near_zero_at_max_updates():
    cfg = optim(cooldown_updates=400)  # inverse_sqrt, warmup 100; cooldown over updates 1601..2000
    assert lr_at(1600, cfg, 2000) == pytest.approx(2.5e-4)  # sqrt(100/1600): the schedule itself
    assert lr_at(1601, cfg, 2000) == pytest.approx(2.5e-4)  # first cooldown update keeps the start value
    assert lr_at(1801, cfg, 2000) == pytest.approx(2.5e-4 * 200 / 400)
    assert lr_at(2000, cfg, 2000) == pytest.approx(2.5e-4 / 400)
    assert lr_at(1601, cfg) == pytest.approx(1e-3 * (100 / 1601) ** 0.5)  # no max_updates: no cooldown
    rates = [lr_at(u, cfg, 2000) for u in range(1601, 2001)]
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_config_rejects_a_cooldown_without_a_longer_max_updates():
    assert load_config(None, ["train.max_updates=500", "optim.cooldown_updates=100"]).optim.cooldown_updates == 100
    with pytest.raises(ConfigError, match="optim.cooldown_updates.*train.max_updates"):
        load_config(None, ["train.max_time_minutes=5", "optim.cooldown_updates=100"])
    with pytest.raises(ConfigError, match="optim.cooldown_updates"):
        load_config(None, ["train.max_updates=100", "optim.cooldown_updates=100"])
