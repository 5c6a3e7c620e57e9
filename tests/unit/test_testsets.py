"""Test-set resolution: data.test plus data.extra_tests, checked for missing files and misaligned line counts."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dist_nmt.config import DataConfig
from dist_nmt.data.testsets import resolve_test_sets
from dist_nmt.errors import DataError

MULTI30K = str(Path(__file__).resolve().parents[2] / "../shared/data/multi30k")
BOTH = DataConfig(root=MULTI30K, test="raw/test_2016_flickr", test_tok_ref="tok/test_2016_flickr.lc.norm.tok.de.gz",
                  extra_tests=("raw/test_2017_flickr",),
                  extra_test_tok_refs=("tok/test_2017_flickr.lc.norm.tok.de.gz",))


def _gz(path: Path, num_lines: int) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(f"line {i}\n" for i in range(num_lines))
    return path


def test_multi30k_test2016_and_test2017_resolve():
    first, second = resolve_test_sets(BOTH)
    assert (first.name, first.is_primary, first.src.name) == ("test_2016_flickr", True, "test_2016_flickr.en.gz")
    assert (second.name, second.is_primary, second.ref.name) == ("test_2017_flickr", False, "test_2017_flickr.de.gz")
    assert second.tok_ref.name == "test_2017_flickr.lc.norm.tok.de.gz"


def test_no_test_set_without_data_test():
    assert resolve_test_sets(DataConfig(root=MULTI30K, test="", extra_tests=("raw/test_2017_flickr",))) == []


def test_missing_extra_test_names_its_key():
    with pytest.raises(DataError, match=r"no en file for data.extra_tests\[0\]='raw/test_2099'"):
        resolve_test_sets(DataConfig(root=MULTI30K, extra_tests=("raw/test_2099",)))


def test_missing_tok_ref_names_its_key():
    with pytest.raises(DataError, match=r"data.extra_test_tok_refs\[0\]='tok/nope.gz': no such file"):
        resolve_test_sets(DataConfig(root=MULTI30K, extra_tests=("raw/test_2017_flickr",),
                                     extra_test_tok_refs=("tok/nope.gz",)))


def test_line_count_mismatch_names_key_and_files(tmp_path):
    _gz(tmp_path / "t.en.gz", 5), _gz(tmp_path / "t.de.gz", 5), _gz(tmp_path / "t.tok.gz", 4)
    cfg = DataConfig(root=MULTI30K, extra_tests=(str(tmp_path / "t"),),
                     extra_test_tok_refs=(str(tmp_path / "t.tok.gz"),))
    with pytest.raises(DataError, match=r"data.extra_tests\[0\]=.*line counts differ.*t.tok.gz has 4.*"
                                        r"check data.extra_test_tok_refs\[0\]") as err:
        resolve_test_sets(cfg)
    assert "\n" not in str(err.value)


def test_same_file_name_twice_is_refused():
    with pytest.raises(DataError, match="share a file name"):
        resolve_test_sets(DataConfig(root=MULTI30K, extra_tests=("raw/test_2016_flickr",)))
