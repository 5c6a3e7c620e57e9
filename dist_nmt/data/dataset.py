"""Prepared data: raw parallel text -> joint BPE vocabulary + memory-mappable integer arrays, and loading them back.

    report = prepare(cfg.data)                      # once, on one process, before training (no-op if unchanged)
    train = EncodedSplit.load(cfg.data.prepared_dir, "train")
    train.src(0), train.tgt_lengths[:5]             # ids without BOS/EOS; lengths without BOS/EOS

Layout of a prepared directory (every file written to a temp dir that is renamed into place at the end, so an
interrupted run never leaves a half-valid directory):

    spm.model, spm.vocab              joint sentencepiece BPE model (ids: pad 0, unk 1, bos 2, eos 3)
    {split}.{src,tgt}.tokens.npy      all ids of a side, concatenated (int16 if the vocab has < 32768 ids, else int32)
    {split}.{src,tgt}.offsets.npy     int64, len = pairs + 1; sentence i is tokens[offsets[i]:offsets[i + 1]]
    manifest.json                     input sha256s, the config fields that shape the output, counts, length stats
    report.json                       pairs kept / dropped by reason, length percentiles, vocab size, seconds

Training pairs with an empty side or a side longer than `data.max_len` subwords are dropped and counted; dev and test
pairs are never dropped (they are evaluated in full), only counted under "flagged".
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from dist_nmt.config import DataConfig
from dist_nmt.data.text import SPLITS, DataError, count_lines, file_sha256, read_lines, split_paths
from dist_nmt.data.vocab import SPECIAL_IDS, Vocab, train_vocab
from dist_nmt.runlock import remove_stale_temps

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SIDES = ("src", "tgt")
MANIFEST, REPORT, VOCAB_PREFIX = "manifest.json", "report.json", "spm"
# DataConfig fields that change the prepared arrays (root, prepared_dir and chunk_lines do not).
KEY_FIELDS = ("src_lang", "tgt_lang", "train", "dev", "test", "vocab_size", "max_len", "character_coverage")

__all__ = ["EncodedSplit", "prepare", "split_paths", "vocab_path"]


def vocab_path(prepared_dir: str | Path) -> Path:
    """Path of the sentencepiece model inside a prepared directory."""
    return Path(prepared_dir) / f"{VOCAB_PREFIX}.model"


def _array_path(root: Path, split: str, side: str, kind: str) -> Path:
    return root / f"{split}.{side}.{kind}.npy"


class EncodedSplit:
    """One prepared split: `len(split)` pairs, `src(i)` / `tgt(i)` id arrays (no BOS/EOS), `src_lengths` etc."""

    def __init__(self, src_tokens: np.ndarray, src_offsets: np.ndarray, tgt_tokens: np.ndarray,
                 tgt_offsets: np.ndarray, name: str = "") -> None:
        if len(src_offsets) != len(tgt_offsets):
            raise DataError(f"split {name!r}: {len(src_offsets) - 1} source vs {len(tgt_offsets) - 1} target "
                            "sentences; re-run dist_nmt.data.prepare")
        self.name = name
        self.src_tokens, self.src_offsets = src_tokens, np.asarray(src_offsets, dtype=np.int64)
        self.tgt_tokens, self.tgt_offsets = tgt_tokens, np.asarray(tgt_offsets, dtype=np.int64)
        self.src_lengths = np.diff(self.src_offsets).astype(np.int32)
        self.tgt_lengths = np.diff(self.tgt_offsets).astype(np.int32)

    @classmethod
    def load(cls, prepared_dir: str | Path, split: str) -> EncodedSplit:
        """Open `split` of a prepared directory; token arrays are memory-mapped, offsets read into memory."""
        root = Path(prepared_dir)
        manifest = _read_json(root / MANIFEST)
        if manifest is None:
            raise DataError(f"no prepared data in {root} ({MANIFEST} missing); run dist_nmt.data.prepare(config.data)")
        if split not in manifest["splits"]:
            raise DataError(f"{root} has no split {split!r}; prepared splits: {', '.join(manifest['splits'])}")
        tokens = [np.load(_array_path(root, split, side, "tokens"), mmap_mode="r") for side in SIDES]
        offsets = [np.load(_array_path(root, split, side, "offsets")) for side in SIDES]
        return cls(tokens[0], offsets[0], tokens[1], offsets[1], name=split)

    def __len__(self) -> int:
        return len(self.src_lengths)

    def src(self, i: int) -> np.ndarray:
        """Source ids of pair `i` (no BOS/EOS)."""
        return np.asarray(self.src_tokens[self.src_offsets[i]:self.src_offsets[i + 1]])

    def tgt(self, i: int) -> np.ndarray:
        """Target ids of pair `i` (no BOS/EOS)."""
        return np.asarray(self.tgt_tokens[self.tgt_offsets[i]:self.tgt_offsets[i + 1]])


def prepare(data: DataConfig, out_dir: str | Path | None = None) -> dict:
    """Validate the raw splits, learn the joint BPE vocabulary on train, encode every split; return the report.

    `out_dir` defaults to `data.prepared_dir`. A no-op (returning the existing report) when the directory already
    holds the output of the same input files (sha256) and the same KEY_FIELDS. Run it on one process only.
    Raises DataError for missing files, mismatched line counts, invalid UTF-8 or a vocab_size the data cannot fill.
    """
    start = time.monotonic()
    out = Path(out_dir if out_dir is not None else data.prepared_dir)
    inputs = _resolve_inputs(data)
    key = _cache_key(data, inputs)
    existing = _existing_report(out, key)
    if existing is not None:
        logger.info("prepared data in %s is up to date (same inputs and settings); nothing to do", out)
        return existing
    line_counts = _validate(inputs)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory is read by every rank's user
    try:
        report = _build(data, inputs, key, line_counts, tmp, start)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared %s in %.1fs: %s", out, report["prepare_seconds"],
                {s: r["pairs_kept"] for s, r in report["splits"].items()})
    return report


def _resolve_inputs(data: DataConfig) -> dict[str, tuple[Path, Path]]:
    splits = [s for s in SPLITS if s != "test" or data.test]
    return {split: split_paths(data, split) for split in splits}


def _cache_key(data: DataConfig, inputs: dict[str, tuple[Path, Path]]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "sentencepiece_version": spm.__version__,
        "config": {name: getattr(data, name) for name in KEY_FIELDS},
        "sha256": {split: [file_sha256(p) for p in paths] for split, paths in inputs.items()},
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _existing_report(out: Path, key: dict) -> dict | None:
    manifest = _read_json(out / MANIFEST)
    if manifest is None:
        return None
    if manifest.get("key") != key:
        logger.info("inputs or settings changed since %s was prepared; rebuilding", out)
        return None
    missing = [name for name in manifest.get("files", []) + [REPORT] if not (out / name).is_file()]
    if missing:
        logger.warning("%s is incomplete (missing %s); rebuilding", out, ", ".join(missing))
        return None
    return _read_json(out / REPORT)


def _validate(inputs: dict[str, tuple[Path, Path]]) -> dict[str, int]:
    """Line counts per split; every file is checked (UTF-8, alignment) before any work starts."""
    counts = {}
    for split, (src, tgt) in inputs.items():
        src_lines, tgt_lines = count_lines(src), count_lines(tgt)
        if src_lines != tgt_lines:
            raise DataError(f"data.{split}: source/target line-count mismatch: {src} has {src_lines} lines but "
                            f"{tgt} has {tgt_lines}; the files must be line-aligned translations of each other")
        counts[split] = src_lines
    return counts


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise DataError(f"refusing to overwrite {out}: it is not a dist_nmt prepared-data directory; "
                        "remove it or set data.prepared_dir to another path")


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished temp dir into place; readers see either the old or the new complete directory."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build(data: DataConfig, inputs: dict[str, tuple[Path, Path]], key: dict, line_counts: dict[str, int],
           tmp: Path, start: float) -> dict:
    train_src, train_tgt = inputs["train"]
    sentences = itertools.chain(read_lines(train_src), read_lines(train_tgt))
    vocab = Vocab.load(train_vocab(sentences, tmp / VOCAB_PREFIX, data.vocab_size, data.character_coverage))
    dtype = np.dtype(np.int16 if vocab.size < 2**15 else np.int32)
    splits = {}
    for split, (src, tgt) in inputs.items():
        splits[split] = {"pairs_read": line_counts[split], **_encode_split(vocab, split, (src, tgt), tmp, data, dtype)}
    if splits["train"]["pairs_kept"] == 0:
        raise DataError(f"data.train: no training pair kept out of {line_counts['train']} in {train_src} "
                        f"(dropped: {splits['train']['dropped']}); raise data.max_len or check the files")
    files = sorted(p.name for p in tmp.iterdir())
    report = {"vocab_size": vocab.size, "splits": splits, "prepare_seconds": round(time.monotonic() - start, 3)}
    manifest = {
        "key": key, "files": files, "vocab_size": vocab.size, "special_ids": SPECIAL_IDS, "dtype": dtype.name,
        "inputs": {split: {"src": str(src), "tgt": str(tgt)} for split, (src, tgt) in inputs.items()},
        "splits": splits,
    }
    (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return report


def _chunks(src: Path, tgt: Path, chunk_lines: int) -> Iterator[tuple[list[str], list[str]]]:
    pairs = zip(read_lines(src), read_lines(tgt), strict=True)
    while chunk := list(itertools.islice(pairs, chunk_lines)):
        src_lines, tgt_lines = zip(*chunk, strict=True)
        yield list(src_lines), list(tgt_lines)


def _encode_split(vocab: Vocab, split: str, paths: tuple[Path, Path], tmp: Path, data: DataConfig,
                  dtype: np.dtype) -> dict:
    """Encode one split chunk by chunk into tmp; return its counts and length stats."""
    drop = split == "train"
    writers = {(side, kind): _NpyWriter(_array_path(tmp, split, side, kind), dtype if kind == "tokens" else np.int64)
               for side in SIDES for kind in ("tokens", "offsets")}
    for side in SIDES:
        writers[side, "offsets"].append(np.zeros(1, dtype=np.int64))
    totals = {side: 0 for side in SIDES}
    flagged = {"empty": 0, "too_long": 0}
    for src_lines, tgt_lines in _chunks(*paths, data.chunk_lines):
        ids = {"src": vocab.encode_batch(src_lines), "tgt": vocab.encode_batch(tgt_lines)}
        lengths = {side: np.fromiter(map(len, ids[side]), np.int64, len(ids[side])) for side in SIDES}
        empty = (lengths["src"] == 0) | (lengths["tgt"] == 0)
        too_long = ~empty & ((lengths["src"] > data.max_len) | (lengths["tgt"] > data.max_len))
        flagged["empty"] += int(empty.sum())
        flagged["too_long"] += int(too_long.sum())
        keep = np.flatnonzero(~(empty | too_long)) if drop else np.arange(len(empty))
        for side in SIDES:
            kept_lengths = lengths[side][keep]
            flat = itertools.chain.from_iterable(ids[side][i] for i in keep)
            writers[side, "tokens"].append(np.fromiter(flat, dtype, int(kept_lengths.sum())))
            writers[side, "offsets"].append(totals[side] + np.cumsum(kept_lengths))
            totals[side] += int(kept_lengths.sum())
    for writer in writers.values():
        writer.close()
    offsets = {side: np.load(_array_path(tmp, split, side, "offsets"), mmap_mode="r") for side in SIDES}
    return {
        "pairs_kept": len(offsets["src"]) - 1,
        "dropped": dict(flagged) if drop else {"empty": 0, "too_long": 0},
        "flagged": flagged,
        "src_tokens": totals["src"], "tgt_tokens": totals["tgt"],
        "src_len": _length_stats(np.diff(offsets["src"])), "tgt_len": _length_stats(np.diff(offsets["tgt"])),
    }


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Percentiles 50/90/99 and max of subword counts (no BOS/EOS); zeros for an empty split."""
    if len(lengths) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": int(lengths.max())}


class _NpyWriter:
    """Append 1-D chunks to a raw side file, then write a `.npy` of the final length (memory stays one chunk)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._raw_path = path.with_suffix(".raw")
        self._raw = open(self._raw_path, "wb")  # closed in close()

    def append(self, values: np.ndarray) -> None:
        self._raw.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.length += len(values)

    def close(self) -> None:
        self._raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.length,)}
        with open(self.path, "wb") as out, open(self._raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 24)
        self._raw_path.unlink()
