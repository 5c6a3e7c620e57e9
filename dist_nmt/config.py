"""Typed, frozen run configuration loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/multi30k.yaml", ["train.max_updates=20", "model.transformer.d_model=128"])

A YAML file may name another with `base: relative/path.yaml`; its mapping is loaded first and this file's keys are
merged over it (presets in `configs/models/` work this way). Unknown keys, wrong types and invalid values raise
`ConfigError` naming the key path and the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_nmt.errors import ConfigError
from dist_nmt.models import MODEL_NAMES, GNMTHParams, TransformerHParams


@dataclass(frozen=True)
class DataConfig:
    """Where the parallel text lives and how it is turned into subword arrays.

    Split prefixes are relative to `root`; files are `{prefix}.{lang}` or `{prefix}.{lang}.gz`.
    """

    root: str = "../shared/data/multi30k"
    src_lang: str = "en"
    tgt_lang: str = "de"
    train: str = "raw/train"
    dev: str = "raw/val"
    test: str = "raw/test_2016_flickr"
    test_tok_ref: str = ""
    # More test sets decoded with the same final model as `test` (only when `test` is set): prefixes like `test`,
    # each with its tokenized lowercase reference in extra_test_tok_refs (same order; empty list = none).
    extra_tests: tuple[str, ...] = ()
    extra_test_tok_refs: tuple[str, ...] = ()
    prepared_dir: str = "data-bin/multi30k"
    vocab_size: int = 8000
    max_len: int = 128
    character_coverage: float = 1.0
    chunk_lines: int = 100_000


@dataclass(frozen=True)
class ModelConfig:
    """`arch` picks the model; its section holds that model's sizes."""

    arch: str = "transformer"
    # auto: fused CPU ops (dist_nmt/ops) when the library loaded; on: fail if it did not; off: pure MXNet.
    fused_ops: str = "auto"
    # Transformer attention in training: auto (fused core on CPU when the library loaded, else batch_dot;
    # interleaved on GPU) | batch_dot | fused | interleaved (MXNet's interleaved matmul ops). No parameter changes.
    attention_impl: str = "auto"
    transformer: TransformerHParams = field(default_factory=TransformerHParams)
    gnmt: GNMTHParams = field(default_factory=GNMTHParams)


@dataclass(frozen=True)
class OptimConfig:
    """Adam with a linear warmup then `schedule` (see dist_nmt.schedule), global-norm clipping."""

    lr: float = 5e-4
    warmup_updates: int = 4000
    warmup_init_lr: float = 1e-7
    beta1: float = 0.9
    beta2: float = 0.98
    epsilon: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    schedule: str = "inverse_sqrt"  # inverse_sqrt | constant | step_decay
    decay_start_updates: int = 0  # step_decay: first update at the decayed rate (0 = never decay)
    decay_every_updates: int = 0  # step_decay: decay again every this many updates (0 = only once)
    decay_factor: float = 0.5  # step_decay: multiplier per decay (GluonNLP's GNMT halves)
    cooldown_updates: int = 0  # linear decay towards 0 over the last this many updates of train.max_updates


@dataclass(frozen=True)
class TrainConfig:
    """Batching, stopping, validation and checkpointing. Intervals are in updates unless named otherwise.

    `max_tokens` bounds every batch per side, padding and dummy rows included: rows * src_pad_len <= max_tokens and
    rows * tgt_pad_len <= max_tokens (each side is padded to its own length; see dist_nmt/data/bucketing.py).
    """

    run_dir: str = "runs/multi30k"
    seed: int = 1
    max_tokens: int = 4096
    accum_steps: int = 1
    data_shards: int = 0
    max_updates: int = 0
    max_epochs: int = 0
    max_time_minutes: float = 0.0
    log_every_updates: int = 50
    eval_every_updates: int = 500
    validate_at_end: bool = True  # validate the final model too, so the test uses the truly best checkpoint
    save_every_updates: int = 500
    keep_last: int = 3
    # At the end, also score the average of the last this-many checkpoints on dev and test the better of it and
    # `best` (0 = off; averages what keep_last kept when fewer).
    average_last: int = 5
    patience: int = 0
    eval_sample_sentences: int = 300
    max_consecutive_bad_updates: int = 5
    allow_data_change: bool = False  # resume onto re-prepared data (same vocabulary) for deliberate fine-tuning
    hybridize: bool = True
    progress_bar: bool = True


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric precision and dynamic loss scaling (the scaler also runs in fp32 for testing)."""

    dtype: str = "fp32"
    loss_scaling: str = "none"
    init_scale: float = 2.0**7  # the loss is a token *sum*: 2^15 overflows fp16 weight gradients (fairseq: 2^7)
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0


@dataclass(frozen=True)
class DistConfig:
    """Horovod behaviour; timeouts bound how long a dead rank can hang the others."""

    stall_check_seconds: int = 60
    stall_shutdown_seconds: int = 120
    gloo_timeout_seconds: int = 300
    consistency_check_every_updates: int = 500
    cycle_time_ms: float = 0.0  # Horovod background cycle (HOROVOD_CYCLE_TIME); 0 = 10 ms on CPU, default on GPU
    # A rank whose training loop makes no progress (no finished update, validation or save) for this long ends the
    # job with one line naming the silent rank (dist_nmt/watchdog.py); 0 = off. Long phases get a multiple of it.
    heartbeat_timeout_seconds: int = 40
    compression: str = "none"  # gradients on the wire: none (fp32) or fp16 (Horovod Compression.fp16, half the bytes)
    hierarchical_allreduce: bool = False  # HOROVOD_HIERARCHICAL_ALLREDUCE=1 (intra-host reduce, then across hosts)


@dataclass(frozen=True)
class DecodeConfig:
    """Beam search: GNMT length penalty ((5+len)/6)^alpha, coverage penalty beta, max len = a*src_len + b."""

    beam_size: int = 4
    alpha: float = 0.6
    beta: float = 0.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    batch_sentences: int = 64
    nbest: int = 1


@dataclass(frozen=True)
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


ON_OFF_KEYS = {"model.fused_ops"}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.fused_ops": ("auto", "on", "off"),
    "model.attention_impl": ("auto", "batch_dot", "fused", "interleaved"),
    "model.arch": MODEL_NAMES,
    "dist.compression": ("fp16", "none"),
    "model.gnmt.attention": ("mlp", "normed_mlp", "luong", "scaled_luong"),
    "model.gnmt.decoder_init": ("encoder", "encoder_h", "zeros"),
    "optim.schedule": ("constant", "inverse_sqrt", "step_decay"),
    "precision.dtype": ("auto", "bf16", "fp16", "fp32"),
    "precision.loss_scaling": ("dynamic", "none"),
}
POSITIVE = {
    "data.vocab_size", "data.max_len", "data.chunk_lines", "train.max_tokens", "train.accum_steps",
    "train.log_every_updates", "train.eval_every_updates", "train.save_every_updates", "train.keep_last",
    "decode.beam_size", "decode.batch_sentences", "decode.nbest", "precision.init_scale",
    "precision.growth_interval", "precision.min_scale", "model.transformer.d_model", "model.transformer.num_heads",
    "model.transformer.d_ff", "model.gnmt.hidden_size", "model.gnmt.embed_size", "optim.lr",
}
PROBABILITY = {
    "optim.label_smoothing", "optim.decay_factor", "model.transformer.dropout", "model.transformer.attention_dropout",
    "model.transformer.activation_dropout", "model.gnmt.dropout", "data.character_coverage",
}
# Keys whose change makes an existing checkpoint unusable (resume refuses and names them): the architecture and its
# sizes, the vocabulary and the languages. Dropout rates and the kernels that compute the same function (fused ops,
# attention implementation) do not change any parameter, so they may change on resume (or be absent from an older
# run's config).
SHAPE_KEYS = ("model", "data.vocab_size", "data.src_lang", "data.tgt_lang")
RESUMABLE_MODEL_KEYS = re.compile(r"^model\.(\w+\.(\w+_)?dropout|fused_ops|attention_impl)$")


def _fail(path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{path}': {msg}")


def _coerce(path: str, value: Any, typ: Any) -> Any:
    """Check (and where lossless, convert) `value` to the annotated type `typ`."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping of {typ.__name__} fields, got {type(value).__name__} {value!r}")
        return _build(typ, value, path)
    if typ is bool:
        if isinstance(value, bool):
            return value
        _fail(path, f"expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(path, f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(path, f"expected a number, got {value!r}")
    if typing.get_origin(typ) is tuple:  # tuple[X, ...]: a YAML list (immutable, so the config stays frozen)
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r} (write [a, b] on the command line, [] for none)")
        item = typing.get_args(typ)[0]
        return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool) and path in ON_OFF_KEYS:  # YAML 1.1 reads bare on/off as booleans
            return "on" if value else "off"
        _fail(path, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {typ!r} at {path}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown config key '{_join(prefix, unknown[0])}' in {where}; "
                          f"valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(_join(prefix, k), v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _validate(cfg: Config) -> None:
    flat = flatten(cfg)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            _fail(key, f"invalid value {flat[key]!r}; choose one of: {', '.join(choices)}")
    for key in POSITIVE:
        if not flat[key] > 0:
            _fail(key, f"must be > 0, got {flat[key]!r}")
    for key in PROBABILITY:
        if not 0.0 <= flat[key] <= 1.0:
            _fail(key, f"must be between 0 and 1, got {flat[key]!r}")
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            _fail(key, f"must not be negative, got {value!r}")
    t = cfg.model.transformer
    if t.d_model % t.num_heads:
        _fail("model.transformer.num_heads", f"d_model={t.d_model} must be divisible by num_heads={t.num_heads}")
    d = cfg.data
    if d.extra_test_tok_refs and len(d.extra_test_tok_refs) != len(d.extra_tests):
        _fail("data.extra_test_tok_refs", f"has {len(d.extra_test_tok_refs)} entries for "
              f"{len(d.extra_tests)} data.extra_tests; give one per test set, in the same order, or []")
    if cfg.model.gnmt.num_bi_layers > cfg.model.gnmt.num_enc_layers:
        _fail("model.gnmt.num_bi_layers", "cannot exceed model.gnmt.num_enc_layers")
    if cfg.optim.cooldown_updates and not cfg.train.max_updates > cfg.optim.cooldown_updates:
        _fail("optim.cooldown_updates", f"{cfg.optim.cooldown_updates} needs train.max_updates larger than it (the "
              f"cooldown ends at train.max_updates, now {cfg.train.max_updates}); set train.max_updates or use 0")
    if not (cfg.train.max_updates or cfg.train.max_epochs or cfg.train.max_time_minutes):
        _fail("train.max_updates", "set at least one of train.max_updates, train.max_epochs, "
              "train.max_time_minutes so training can stop")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (data, model, train, ...)")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return _merge(_read_yaml(base_path, seen + (path.resolve(),)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` (value read as YAML, so `true`, `3`, `1e-4` get their types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.max_updates=20")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested mapping."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML at `path` (None = all defaults), apply dotted overrides, validate."""
    raw = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return from_dict(raw)


ONE_STEP = ("train.max_updates=1", "optim.cooldown_updates=0")


def load_for_one_step(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config for code that runs a step or a decode, never a whole training (benchmarks, tests): `path` with a
    one-update stop and no cooldown (which needs a longer stop), then `overrides`."""
    return load_config(path, [*ONE_STEP, *overrides])


def to_dict(cfg: Any) -> dict:
    """Nested plain-dict view (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.max_tokens": 4096, ...}` for every leaf."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key))
        else:
            out[key] = value
    return out


def config_hash(cfg: Config) -> str:
    """Stable short hash of the whole resolved config (stored in every checkpoint)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _is_shape_key(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SHAPE_KEYS) and not RESUMABLE_MODEL_KEYS.match(key)


def shape_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Flattened keys under SHAPE_KEYS (dropout rates excepted) whose values differ between two flattened configs."""
    return [k for k in sorted(set(old) | set(new)) if _is_shape_key(k) and old.get(k) != new.get(k)]


def harmless_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differing keys a resume may change (everything not in `shape_diff`), for logging."""
    return [k for k in sorted(set(old) | set(new)) if not _is_shape_key(k) and old.get(k) != new.get(k)]


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


__all__ = [
    "Config", "ConfigError", "DataConfig", "DecodeConfig", "DistConfig", "ModelConfig", "OptimConfig",
    "PrecisionConfig", "TrainConfig", "config_hash", "flatten", "from_dict", "harmless_diff", "load_config",
    "save_config", "shape_diff", "to_dict",
]
