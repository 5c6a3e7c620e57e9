"""The joint BPE vocabulary: fixed special ids, round trip on real text, decode rules, small-corpus errors."""
from __future__ import annotations

import itertools
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from dist_nmt.config import DataConfig
from dist_nmt.data.text import DataError, read_lines, split_paths
from dist_nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab, train_vocab

MULTI30K = Path(__file__).resolve().parents[2] / "../shared/data/multi30k"
SMALL = ["a dog runs", "ein hund läuft", "two men talk", "zwei männer reden"] * 5


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory: pytest.TempPathFactory) -> Vocab:
    """1000-piece BPE learned on the first 5000 Multi30k training pairs (both sides)."""
    if not MULTI30K.is_dir():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    src, tgt = split_paths(DataConfig(root=str(MULTI30K)), "train")
    lines = itertools.chain(itertools.islice(read_lines(src), 5000), itertools.islice(read_lines(tgt), 5000))
    prefix = tmp_path_factory.mktemp("vocab") / "spm"
    return Vocab.load(train_vocab(lines, prefix, vocab_size=1000, character_coverage=1.0))


def test_special_ids_are_fixed(real_vocab: Vocab) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert [real_vocab.piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert real_vocab.size == len(real_vocab) == 1000


def test_round_trip_on_real_dev_text(real_vocab: Vocab) -> None:
    src, tgt = split_paths(DataConfig(root=str(MULTI30K)), "dev")
    for path in (src, tgt):
        lines = list(itertools.islice(read_lines(path), 200))
        encoded = real_vocab.encode_batch(lines)
        assert encoded == [real_vocab.encode(line) for line in lines]
        assert all(BOS_ID not in ids and EOS_ID not in ids for ids in encoded)
        known = [(line, ids) for line, ids in zip(lines, encoded, strict=True) if UNK_ID not in ids]
        assert len(known) >= 190, "almost every dev sentence should be covered by the training characters"
        # sentencepiece's nmt_nfkc normalisation: NFKC (e.g. no-break space -> space), whitespace runs collapsed
        assert all(real_vocab.decode(ids) == " ".join(unicodedata.normalize("NFKC", line).split())
                   for line, ids in known)


def test_decode_stops_at_eos_and_skips_pad_and_bos(real_vocab: Vocab) -> None:
    ids = real_vocab.encode("A dog runs.")
    assert real_vocab.decode([BOS_ID, *ids, EOS_ID, *real_vocab.encode("junk"), PAD_ID]) == "A dog runs."
    assert real_vocab.decode(np.array([BOS_ID, *ids, PAD_ID, PAD_ID], dtype=np.int16)) == "A dog runs."
    assert real_vocab.decode([EOS_ID, *ids]) == ""


def test_vocab_size_too_large_names_the_key_and_the_limit(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.vocab_size=5000 is too large .* at most \d+"):
        train_vocab(iter(SMALL), tmp_path / "spm", vocab_size=5000, character_coverage=1.0)


def test_load_missing_model_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run dist_nmt.data.prepare"):
        Vocab.load(tmp_path / "spm.model")


def test_load_rejects_a_model_with_other_special_ids(tmp_path: Path) -> None:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SMALL), model_prefix=str(tmp_path / "other"),
                                   model_type="bpe", vocab_size=30, minloglevel=2)  # sentencepiece defaults: unk=0
    with pytest.raises(DataError, match="special ids"):
        Vocab.load(tmp_path / "other.model")
