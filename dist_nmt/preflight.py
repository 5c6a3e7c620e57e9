"""Checks every command runs before its expensive part, so a user's mistake fails in seconds with one line.

    check_run_dir(cfg.train.run_dir)            # not a file, not below a file, checkpoints/ not a file, writable
    check_test_references(cfg.data)             # data.test_tok_ref exists and has one line per test sentence
    check_output_file(args.output, "--output")  # its directory exists and is writable

MXNet-free; each raises ConfigError/DataError naming the path or key and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from dist_nmt.config import DataConfig
from dist_nmt.data.text import check_readable, count_lines, split_paths
from dist_nmt.errors import ConfigError, DataError


def _file_above(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_run_dir(run_dir: str | Path, must_exist: bool = False, key: str = "train.run_dir") -> Path:
    """A usable run directory (created later by the trainer): not a file, no file in its path, writable."""
    path = Path(run_dir)
    blocker = _file_above(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is below {blocker}, which is a file"
        raise ConfigError(f"{key}={str(run_dir)!r} {where}; choose a directory path")
    if must_exist and not (path / "config.yaml").is_file():
        raise ConfigError(f"{key}={str(run_dir)!r} holds no trained run ({path / 'config.yaml'} is missing); "
                          "train first or pass the run directory of a training run")
    ckpts = path / "checkpoints"
    if ckpts.exists() and not ckpts.is_dir():
        raise ConfigError(f"{ckpts} is a file, but checkpoints are written there; move it away")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not must_exist and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(run_dir)!r}: {existing} is not writable; choose a writable directory")
    return path


def check_output_file(path: str | Path | None, option: str) -> None:
    """An output file that can be written: its directory exists and is writable, and it is not a directory."""
    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{option} {out} is a directory; give a file name")
    parent = out.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {out}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"{option} {out}: not writable")


def check_test_references(data: DataConfig) -> None:
    """With a test split and data.test_tok_ref: the reference exists and has one line per test source line."""
    if not data.test or not data.test_tok_ref:
        return
    src, _ = split_paths(data, "test")
    ref = check_readable(Path(data.root) / data.test_tok_ref, "data.test_tok_ref")
    expected, found = count_lines(src), count_lines(ref)
    if expected != found:
        raise DataError(f"data.test_tok_ref: {ref} has {found} lines but the test split {src} has {expected}; "
                        "give the tokenized reference of the same test set")
