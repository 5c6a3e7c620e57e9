"""prepare() and EncodedSplit: bad inputs, drop/count rules, idempotence, atomicity, and the real Multi30k corpus."""
from __future__ import annotations

import gzip
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dist_nmt.data.dataset as dataset
from dist_nmt.config import DataConfig
from dist_nmt.data.dataset import EncodedSplit, prepare, vocab_path
from dist_nmt.data.text import DataError, read_lines, split_paths
from dist_nmt.data.vocab import Vocab

MULTI30K = Path(__file__).resolve().parents[2] / "../shared/data/multi30k"
SYLLABLES = ["ka", "to", "mi", "ru", "sen", "dal", "po", "vek", "lin", "sa"]


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(40)]
    return [" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(n)]


def _write(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _corpus(root: Path, gz: bool = False, n_train: int = 60, **splits: tuple[list[str], list[str]]) -> DataConfig:
    """A synthetic corpus in `root` (train/dev/test of made-up words unless given) and a config reading it."""
    root.mkdir(parents=True, exist_ok=True)
    default = {"train": n_train, "dev": 10, "test": 8}
    for seed, (split, n) in enumerate(default.items()):
        src, tgt = splits.get(split, (_sentences(n, seed), _sentences(n, seed + 100)))
        for lang, lines in (("en", src), ("de", tgt)):
            _write(root / f"{split}.{lang}{'.gz' if gz else ''}", lines)
    return DataConfig(root=str(root), train="train", dev="dev", test="test", vocab_size=60, max_len=12,
                      prepared_dir=str(root.parent / "prepared"))


def _arrays(prepared: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(prepared.glob("*.npy"))}


def test_real_multi30k_default_vocab(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not MULTI30K.is_dir():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    data = DataConfig(root=str(MULTI30K))
    out = tmp_path / "m30k"
    report = prepare(data, out)
    assert report["vocab_size"] == 8000
    assert {s: r["pairs_kept"] for s, r in report["splits"].items()} == {"train": 29000, "dev": 1014, "test": 1000}
    assert set(report["splits"]["train"]["src_len"]) == {"p50", "p90", "p99", "max"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"]["sha256"]["train"][0] == "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"
    assert manifest["dtype"] == "int16"
    dev = EncodedSplit.load(out, "dev")
    assert isinstance(dev.src_tokens, np.memmap) and dev.src_tokens.dtype == np.int16
    vocab = Vocab.load(vocab_path(out))
    src_path, tgt_path = split_paths(data, "dev")
    assert vocab.decode(dev.src(0)) == next(read_lines(src_path))
    assert vocab.decode(dev.tgt(0)) == next(read_lines(tgt_path))
    assert len(dev) == len(dev.src_lengths) == len(dev.tgt_lengths) == 1014
    assert dev.src_lengths[0] == len(dev.src(0)) == len(vocab.encode(next(read_lines(src_path))))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="dist_nmt.data.dataset"):
        assert prepare(data, out) == report
    assert "up to date" in caplog.text and (out / "manifest.json").stat().st_mtime_ns == stamp


def test_gz_and_plain_inputs_give_identical_arrays(tmp_path: Path) -> None:
    prepare(_corpus(tmp_path / "plain"), tmp_path / "a")
    prepare(_corpus(tmp_path / "gz", gz=True), tmp_path / "b")
    assert _arrays(tmp_path / "a") == _arrays(tmp_path / "b") and len(_arrays(tmp_path / "a")) == 12


def test_small_chunks_give_the_same_arrays(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    prepare(data, tmp_path / "big")
    prepare(replace(data, chunk_lines=7), tmp_path / "small")
    assert _arrays(tmp_path / "big") == _arrays(tmp_path / "small")


def test_empty_and_too_long_train_pairs_are_dropped_and_counted_dev_pairs_kept(tmp_path: Path) -> None:
    good_src, good_tgt = _sentences(60, 1), _sentences(60, 2)
    long_line = " ".join(_sentences(20, 3))  # about 100 words: far more than max_len=40 subwords
    train = (good_src + ["", "ka to", long_line], good_tgt + ["mi ru", "", "sen"])
    dev = (["ka", "", long_line], ["to", "mi", "dal"])
    data = replace(_corpus(tmp_path / "c", train=train, dev=dev), max_len=40)
    report = prepare(data, tmp_path / "out")
    tr, dv = report["splits"]["train"], report["splits"]["dev"]
    assert (tr["pairs_read"], tr["pairs_kept"], tr["dropped"]) == (63, 60, {"empty": 2, "too_long": 1})
    assert (dv["pairs_read"], dv["pairs_kept"], dv["dropped"]) == (3, 3, {"empty": 0, "too_long": 0})
    assert dv["flagged"] == {"empty": 1, "too_long": 1}
    vocab = Vocab.load(vocab_path(tmp_path / "out"))
    train_split = EncodedSplit.load(tmp_path / "out", "train")
    assert [vocab.decode(train_split.src(i)) for i in (0, 59)] == [good_src[0], good_src[59]]
    assert train_split.src_lengths.max() <= 40 and train_split.tgt_lengths.min() > 0
    dev_split = EncodedSplit.load(tmp_path / "out", "dev")
    assert dev_split.src_lengths[1] == 0 and dev_split.src_lengths[2] > 40


def test_line_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c", dev=(_sentences(10, 5), _sentences(9, 6)))
    with pytest.raises(DataError) as err:
        prepare(data)
    message = str(err.value)
    assert "data.dev" in message and "dev.en has 10 lines" in message and "dev.de has 9" in message


def test_invalid_utf8_names_file_and_line_before_any_work(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    (tmp_path / "c/test.de").write_bytes(b"ok\nok\nok\nbad \xff byte\n" + b"ok\n" * 4)
    with pytest.raises(DataError, match=r"test.de: line 4 is not valid UTF-8"):
        prepare(data)
    assert not Path(data.prepared_dir).exists()


def test_missing_file_names_the_key(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    (tmp_path / "c/dev.de").unlink()
    with pytest.raises(DataError, match=r"data.dev.*tried .*dev.de, .*dev.de.gz"):
        prepare(data)


def test_missing_root_gives_the_multi30k_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"https://github.com/multi30k/dataset \(files data/task1/raw/\*.gz\)"):
        prepare(DataConfig(root=str(tmp_path / "absent")), tmp_path / "out")


def test_vocab_size_too_large_for_a_tiny_corpus(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    with pytest.raises(DataError, match=r"data.vocab_size=8000 is too large .* at most \d+"):
        prepare(replace(data, vocab_size=8000))
    assert not Path(data.prepared_dir).exists() and not list(tmp_path.glob(".*tmp*"))


def test_no_test_split(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    report = prepare(replace(data, test=""))
    assert set(report["splits"]) == {"train", "dev"}
    with pytest.raises(DataError, match="prepared splits: train, dev"):
        EncodedSplit.load(data.prepared_dir, "test")


def test_changed_input_or_setting_rebuilds(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    assert prepare(data)["splits"]["dev"]["pairs_read"] == 10
    _write(tmp_path / "c/dev.en", _sentences(11, 7))
    _write(tmp_path / "c/dev.de", _sentences(11, 8))
    assert prepare(data)["splits"]["dev"]["pairs_read"] == 11
    shorter = prepare(replace(data, max_len=3))
    assert shorter["splits"]["train"]["dropped"]["too_long"] > 0


def test_interrupted_prepare_keeps_the_previous_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _corpus(tmp_path / "c")
    before = prepare(data)
    arrays = _arrays(Path(data.prepared_dir))
    _write(tmp_path / "c/dev.en", _sentences(10, 9))
    real_encode = dataset._encode_split

    def crash_on_dev(vocab: Vocab, split: str, *args: object) -> dict:
        if split == "dev":
            raise KeyboardInterrupt
        return real_encode(vocab, split, *args)

    monkeypatch.setattr(dataset, "_encode_split", crash_on_dev)
    with pytest.raises(KeyboardInterrupt):
        prepare(data)
    assert _arrays(Path(data.prepared_dir)) == arrays
    assert json.loads((Path(data.prepared_dir) / "report.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "prepared"]  # no temp or half-written dirs


def test_refuses_to_overwrite_an_unrelated_directory(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "c")
    Path(data.prepared_dir).mkdir()
    (Path(data.prepared_dir) / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare(data)


def test_load_without_prepare_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest.json missing\); run dist_nmt.data.prepare"):
        EncodedSplit.load(tmp_path, "train")
