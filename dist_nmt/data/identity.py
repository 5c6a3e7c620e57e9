"""What prepared data a run was trained on, and whether the prepared data still matches its raw inputs.

    identity = data_identity("data-bin/multi30k")   # {"vocab_sha256": ..., "splits": {"train": [src, tgt], ...}}
    check_prepared_current(cfg.data)                 # DataError "re-run dist-nmt prepare" if inputs/settings changed
    refuse_data_change(recorded, identity, where, allow_data_change=False)

The identity is stored in every checkpoint's state.json and in `run_dir/data_identity.json`; resume and translate
compare it with the prepared directory in use, so a model never silently meets another vocabulary or corpus.
"""
from __future__ import annotations

import json
from pathlib import Path

from dist_nmt.config import DataConfig
from dist_nmt.data.dataset import MANIFEST, _cache_key, _resolve_inputs, vocab_path
from dist_nmt.data.text import file_sha256
from dist_nmt.errors import DataError

IDENTITY_FILE = "data_identity.json"
# The test split is read raw at test time, so only these prepared splits are part of what a model was trained on.
TRAINED_SPLITS = ("train", "dev")


def _manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"no readable prepared data in {prepared_dir} ({path} missing or unreadable); run "
                        "`dist-nmt prepare --config <your config>` first") from None


def data_identity(prepared_dir: str | Path) -> dict:
    """sha256 of the vocabulary model and, per split, the sha256s of the raw inputs it was encoded from."""
    manifest = _manifest(prepared_dir)
    vocab = vocab_path(prepared_dir)
    if not vocab.is_file():
        raise DataError(f"vocabulary model {vocab} not found; re-run dist-nmt prepare")
    return {"vocab_sha256": file_sha256(vocab), "vocab_size": manifest.get("vocab_size"),
            "splits": {s: v for s, v in manifest.get("key", {}).get("sha256", {}).items() if s in TRAINED_SPLITS},
            "settings": manifest.get("key", {}).get("config", {})}


def check_prepared_current(data: DataConfig) -> None:
    """DataError naming what changed when the raw inputs or data settings differ from what was prepared."""
    manifest = _manifest(data.prepared_dir)
    inputs = {s: p for s, p in _resolve_inputs(data).items() if s in TRAINED_SPLITS}
    recorded, current = manifest.get("key", {}), _cache_key(data, inputs)
    changed = [f"data.{k} ({recorded.get('config', {}).get(k)!r} -> {v!r})"
               for k, v in current["config"].items() if k != "test" and recorded.get("config", {}).get(k) != v]
    changed += [f"{split} text ({', '.join(str(p) for p in paths)})" for split, paths in inputs.items()
                if recorded.get("sha256", {}).get(split) != current["sha256"][split]]
    if changed:
        raise DataError(f"the prepared data in {data.prepared_dir} no longer matches the config and raw inputs: "
                        f"changed {'; '.join(changed)}; re-run dist-nmt prepare --config <your config>")
    if manifest.get("vocab_size") != data.vocab_size:
        raise DataError(f"{data.prepared_dir} holds a vocabulary of {manifest.get('vocab_size')} pieces but "
                        f"data.vocab_size={data.vocab_size}; re-run dist-nmt prepare or set data.vocab_size="
                        f"{manifest.get('vocab_size')}")


def refuse_data_change(recorded: dict | None, current: dict, where: str, allow_data_change: bool = False) -> list[str]:
    """Raise DataError if `recorded` (from a checkpoint) names another vocabulary, or other data unless allowed.

    Returns the changed splits (empty when identical or when `recorded` is None, i.e. an older checkpoint).
    """
    if not recorded:
        return []
    if recorded.get("vocab_sha256") != current["vocab_sha256"]:
        raise DataError(f"{where} was trained with another vocabulary than the prepared data now in use "
                        f"(vocabulary sha256 {recorded.get('vocab_sha256', '?')[:12]} vs "
                        f"{current['vocab_sha256'][:12]}): token ids would mean other subwords. Point "
                        "data.prepared_dir at the data it was trained on, or start a new train.run_dir")
    changed = [s for s in sorted(set(recorded.get("splits", {})) | set(current["splits"]))
               if recorded.get("splits", {}).get(s) != current["splits"].get(s)]
    if changed and not allow_data_change:
        raise DataError(f"{where} was trained on other data: the {', '.join(changed)} split(s) changed since "
                        "(same vocabulary). To fine-tune on the new data deliberately set "
                        "train.allow_data_change=true; otherwise restore the old data and re-run dist-nmt prepare")
    return changed
