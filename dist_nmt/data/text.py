"""Raw parallel text: locating split files, reading lines (plain or gzip) and validating UTF-8.

    src_path, tgt_path = split_paths(cfg.data, "dev")      # e.g. ../shared/data/multi30k/raw/val.en.gz
    for line in read_lines(src_path): ...                   # str without the trailing "\\n"

A split prefix `P` (e.g. `data.dev = "raw/val"`) names the files `{data.root}/P.{lang}` or `{data.root}/P.{lang}.gz`.
Lines are split on b"\\n" only (never on other Unicode line breaks), so line numbers match `sed -n Np` and `wc -l`.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from dist_nmt.config import DataConfig
from dist_nmt.errors import DataError

SPLITS = ("train", "dev", "test")
MULTI30K_HINT = (
    "The Multi30k corpus comes from the official repository https://github.com/multi30k/dataset "
    "(files data/task1/raw/*.gz): put them in that directory or set data.root."
)
_READ_BYTES = 1 << 20


def split_paths(data: DataConfig, split: str) -> tuple[Path, Path]:
    """Resolve the raw (source, target) files of `split` ("train", "dev" or "test").

    Tries `{root}/{prefix}.{lang}` then the same + `.gz`. Raises DataError naming the config key and the paths tried,
    or, if `data.root` itself is missing, where the Multi30k corpus comes from.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    prefix = getattr(data, split)
    if not prefix:
        raise DataError(f"data.{split} is empty, so there is no {split} split; set data.{split} to a file prefix")
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data.root={data.root!r} does not exist (resolved to {root.resolve()}). {MULTI30K_HINT}")
    return _find(root, prefix, data.src_lang, split), _find(root, prefix, data.tgt_lang, split)


def _find(root: Path, prefix: str, lang: str, split: str) -> Path:
    return find_text_file(root, prefix, lang, f"data.{split}")


def find_text_file(root: Path, prefix: str, lang: str, key: str) -> Path:
    """`{root}/{prefix}.{lang}` or the same + `.gz`; DataError naming config `key` and the paths tried if neither."""
    tried = [root / f"{prefix}.{lang}", root / f"{prefix}.{lang}.gz"]
    for path in tried:
        if path.is_file():
            return path
    raise DataError(f"no {lang} file for {key}={prefix!r}: tried {', '.join(str(p) for p in tried)}; "
                    f"fix {key} (a prefix relative to data.root={str(root)!r}) or add the file")


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_readable(path: str | Path, what: str = "") -> Path:
    """`path` as a Path if it is a readable file, else DataError naming it (missing / a directory / no permission)."""
    path, label = Path(path), f"{what}: " if what else ""
    if not path.exists():
        raise DataError(f"{label}{path}: no such file; check the path")
    if path.is_dir():
        raise DataError(f"{label}{path} is a directory, not a text file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{label}{path}: not readable (permission denied)")
    return path


def read_lines(path: str | Path | IO[bytes], name: str = "") -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (plain or `.gz`) or binary stream (stdin's `.buffer`), with only the
    trailing "\\n" removed: lines split on "\\n" only, so one line in is one line out whatever bytes it holds.

    Raises DataError naming the file (or `name`, e.g. "stdin") and the 1-based line number of the first invalid UTF-8
    byte sequence, or naming the file if it is missing or the gzip stream is corrupt.
    """
    if not isinstance(path, (str, Path)):
        yield from _decode_lines(path, name or "stdin")
        return
    path = check_readable(path)
    lineno = 0
    try:
        with _open_binary(path) as fh:
            for lineno, text in enumerate(_decode_lines(fh, str(path)), start=1):  # noqa: B007 - named in the error
                yield text
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read after line {lineno} ({err}); the file is truncated or corrupt") from None


def _decode_lines(fh: IO[bytes], path: str) -> Iterator[str]:
    for lineno, raw in enumerate(fh, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: line {lineno} is not valid UTF-8 ({err.reason} at byte {err.start} "
                            "of the line); re-encode the file as UTF-8") from None
        yield text[:-1] if text.endswith("\n") else text


def count_lines(path: str | Path) -> int:
    """Number of lines in a UTF-8 text file (plain or `.gz`), validating the encoding on the way.

    A final line without "\\n" counts. Reads in 1 MiB blocks (fast on millions of lines); on invalid UTF-8 it
    re-reads with `read_lines` to raise the DataError that names the line.
    """
    path = check_readable(path)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    lines, last = 0, b"\n"
    try:
        with _open_binary(path) as fh:
            while block := fh.read(_READ_BYTES):
                lines += block.count(b"\n")
                last = block[-1:]
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        for _ in read_lines(path):
            pass
        raise DataError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None  # unreachable in practice
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err}); the file is truncated or corrupt") from None
    return lines + (last != b"\n")


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of the file as stored (compressed bytes for `.gz`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()
