"""Config loading: types, unknown keys, invalid values, overrides, base files, hashing."""
from pathlib import Path

import pytest

from dist_nmt.config import (
    ConfigError,
    config_hash,
    flatten,
    from_dict,
    load_config,
    load_for_one_step,
    save_config,
    shape_diff,
)

RUNNABLE = {"train": {"max_updates": 10}}


def test_yaml_presets_load_and_override():
    cfg = load_config("configs/multi30k.yaml", ["train.max_updates=20", "model.transformer.d_model=128"])
    assert cfg.train.max_updates == 20
    assert cfg.model.transformer.d_model == 128
    assert cfg.model.arch == "transformer"
    assert cfg.data.test_tok_ref.endswith(".tok.de.gz")


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")))
def test_every_shipped_job_config_is_valid_as_shipped(path):
    load_config(path)  # no override: a key that validates only beside one (e.g. a cooldown) is a defect


@pytest.mark.parametrize("path", sorted(Path("configs").rglob("*.yaml")))
def test_every_config_loads_for_one_step(path):
    """What the benchmarks do with a preset or a job config (presets carry no stop, the long job a cooldown)."""
    assert load_for_one_step(path, ["train.seed=3"]).train.max_updates == 1


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_update'.*valid keys: .*max_updates"):
        from_dict({"train": {"max_update": 3}})


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*valid keys: data, model"):
        from_dict({"trian": {}, **RUNNABLE})


@pytest.mark.parametrize("raw, pattern", [
    ({"train": {"max_updates": "ten"}}, r"'train.max_updates': expected an integer, got 'ten'"),
    ({"train": {"max_updates": 1.5}}, r"'train.max_updates': expected an integer"),
    ({"train": {"max_updates": 5, "hybridize": "yes"}}, r"'train.hybridize': expected true or false"),
    ({"model": {"arch": "gnmtt"}, **RUNNABLE},
     r"'model.arch': invalid value 'gnmtt'; choose one of: gnmt, transformer"),
    ({"precision": {"dtype": "fp8"}, **RUNNABLE}, r"choose one of: auto, bf16, fp16, fp32"),
    ({"model": {"attention_impl": "flash"}, **RUNNABLE},
     r"'model.attention_impl': invalid value 'flash'; choose one of: auto, batch_dot, fused, interleaved"),
    ({"dist": {"compression": "int8"}, **RUNNABLE},
     r"'dist.compression': invalid value 'int8'; choose one of: fp16, none"),
    ({"optim": {"label_smoothing": 1.5}, **RUNNABLE}, r"'optim.label_smoothing': must be between 0 and 1"),
    ({"train": {"max_updates": 5, "max_tokens": 0}}, r"'train.max_tokens': must be > 0"),
    ({"model": {"transformer": {"d_model": 100, "num_heads": 8}}, **RUNNABLE}, r"divisible by num_heads"),
    ({"data": "x", **RUNNABLE}, r"'data': expected a mapping"),
    ({}, r"set at least one of train.max_updates"),
])
def test_invalid_values_are_named(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(raw)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_updates"])


def test_override_types_parsed_as_yaml():
    cfg = load_config(None, ["train.max_updates=7", "train.hybridize=false", "optim.lr=1e-4"])
    assert (cfg.train.max_updates, cfg.train.hybridize, cfg.optim.lr) == (7, False, 1e-4)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_base_chain_merges(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {max_updates: 3, seed: 5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {seed: 9}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.max_updates, cfg.train.seed) == (3, 9)


def test_saved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config("configs/tiny.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config("configs/tiny.yaml", ["train.seed=2"])) != config_hash(cfg)


def test_shape_diff_names_model_keys_only():
    a = flatten(load_config("configs/tiny.yaml"))
    b = flatten(load_config("configs/tiny.yaml", ["model.transformer.d_model=32", "train.max_updates=99"]))
    assert shape_diff(a, b) == ["model.transformer.d_model"]


def test_kernel_choices_may_change_on_resume_and_be_missing_from_older_runs():
    old = flatten(load_config("configs/tiny.yaml"))
    del old["model.attention_impl"]  # a run saved before the key existed
    new = flatten(load_config("configs/tiny.yaml", ["model.attention_impl=interleaved", "model.fused_ops=off"]))
    assert shape_diff(old, new) == []


@pytest.mark.parametrize("raw,expected", [("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on")])
def test_fused_ops_accepts_bare_on_off(raw, expected):
    assert load_config(None, [f"model.fused_ops={raw}", "train.max_updates=1"]).model.fused_ops == expected


def test_list_keys_load_as_tuples_and_round_trip(tmp_path):
    cfg = load_config("configs/multi30k.yaml", ["train.max_updates=1"])
    assert cfg.data.extra_tests == ("raw/test_2017_flickr",)
    assert cfg.data.extra_test_tok_refs == ("tok/test_2017_flickr.lc.norm.tok.de.gz",)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    override = load_config(None, ["train.max_updates=1", "data.extra_tests=[a, b]", "data.extra_test_tok_refs=[]"])
    assert override.data.extra_tests == ("a", "b") and override.data.extra_test_tok_refs == ()


@pytest.mark.parametrize("overrides, pattern", [
    (["data.extra_tests=raw/x"], r"'data.extra_tests': expected a list, got 'raw/x'"),
    (["data.extra_tests=[raw/x, [1]]"], r"'data.extra_tests\[1\]': expected a string"),
    (["data.extra_tests=[a, b]", "data.extra_test_tok_refs=[t]"],
     r"'data.extra_test_tok_refs': has 1 entries for 2 data.extra_tests"),
    (["train.average_last=-1"], r"'train.average_last': must not be negative"),
])
def test_list_keys_are_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["train.max_updates=1", *overrides])
