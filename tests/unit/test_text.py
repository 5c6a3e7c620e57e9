"""Raw text reading: plain/gz, newline handling, UTF-8 errors with line numbers, split file resolution."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dist_nmt.config import DataConfig
from dist_nmt.data.text import DataError, count_lines, file_sha256, read_lines, split_paths

MULTI30K = Path(__file__).resolve().parents[2] / "../shared/data/multi30k"


def _write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_read_lines_strips_only_the_trailing_newline(tmp_path: Path, name: str) -> None:
    data = "one  \ntwo\r\n\nvier \u2028 still four\nlast without newline".encode()
    path = _write(tmp_path / name, data)
    assert list(read_lines(path)) == ["one  ", "two\r", "", "vier \u2028 still four", "last without newline"]
    assert count_lines(path) == 5


def test_count_lines_of_empty_and_newline_terminated_files(tmp_path: Path) -> None:
    assert count_lines(_write(tmp_path / "empty", b"")) == 0
    assert count_lines(_write(tmp_path / "two", b"a\nb\n")) == 2


@pytest.mark.parametrize("name", ["bad.de", "bad.de.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, "gut\nschön\n".encode() + b"kaputt \xc3\x28 hier\nok\n")
    with pytest.raises(DataError, match=rf"{name}: line 3 is not valid UTF-8"):
        list(read_lines(path))
    with pytest.raises(DataError, match=r"line 3 is not valid UTF-8"):
        count_lines(path)


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    good = gzip.compress(b"a line\n" * 1000)
    path = _write(tmp_path / "cut.en.gz", b"")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut.en.gz.*truncated or corrupt"):
        count_lines(path)


def _config(root: Path, **kw: str) -> DataConfig:
    return DataConfig(root=str(root), train="train", dev="sub/dev", test="test", **kw)


def test_split_paths_prefers_plain_and_falls_back_to_gz(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub/dev.en", b"x\n")
    _write(tmp_path / "sub/dev.de.gz", b"y\n")
    assert split_paths(_config(tmp_path), "dev") == (tmp_path / "sub/dev.en", tmp_path / "sub/dev.de.gz")


def test_missing_file_names_the_config_key_and_the_paths_tried(tmp_path: Path) -> None:
    _write(tmp_path / "train.en", b"x\n")
    with pytest.raises(DataError) as err:
        split_paths(_config(tmp_path), "train")
    message = str(err.value)
    assert "data.train" in message
    assert str(tmp_path / "train.de") in message and str(tmp_path / "train.de.gz") in message


def test_missing_root_points_to_the_multi30k_repository(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        split_paths(_config(tmp_path / "nowhere"), "dev")
    message = str(err.value)
    assert "https://github.com/multi30k/dataset" in message and "data/task1/raw/*.gz" in message
    assert "data.root" in message


def test_empty_split_prefix_and_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.test is empty"):
        split_paths(DataConfig(root=str(tmp_path), test=""), "test")
    with pytest.raises(DataError, match="choose one of: train, dev, test"):
        split_paths(DataConfig(root=str(tmp_path)), "valid")


def test_real_multi30k_dev_resolves_to_gz_and_is_valid() -> None:
    if not MULTI30K.is_dir():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    src, tgt = split_paths(DataConfig(root=str(MULTI30K)), "dev")
    assert (src.name, tgt.name) == ("val.en.gz", "val.de.gz")
    assert count_lines(src) == count_lines(tgt) == 1014
    assert file_sha256(src) == "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"  # README value
