"""The joint source/target subword vocabulary: a sentencepiece BPE model with fixed special ids.

    vocab = Vocab.load(vocab_path("data-bin/multi30k"))
    ids = vocab.encode("A dog runs.")          # [..] without BOS/EOS
    vocab.decode(ids + [EOS_ID, 7, 8])          # "A dog runs." (stops at the first EOS)

Ids 0..3 are PAD, UNK, BOS, EOS in every model trained here; `Vocab.load` refuses a model that disagrees, because
the model code and the batch layout rely on them.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from dist_nmt.data.text import DataError

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
# sentencepiece reservoir-samples at most this many sentences for learning merges (bounds memory on huge corpora).
MAX_TRAINING_SENTENCES = 10_000_000
_SAMPLING_SEED = 1234


class Vocab:
    """Text <-> subword ids through a sentencepiece model (`Vocab.load(path)`)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None) -> None:
        self._sp = processor
        self.path = path
        found = {"pad": processor.pad_id(), "unk": processor.unk_id(), "bos": processor.bos_id(),
                 "eos": processor.eos_id()}
        if found != SPECIAL_IDS:
            raise DataError(f"vocabulary {path} has special ids {found}, expected {SPECIAL_IDS}; "
                            "re-run dist_nmt.data.prepare to rebuild it")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Load a sentencepiece `.model` file written by `prepare`."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"vocabulary model {path} not found; run dist_nmt.data.prepare(config.data) first")
        return cls(spm.SentencePieceProcessor(model_file=str(path)), path)

    @property
    def size(self) -> int:
        """Number of ids, special ids included."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> list[int]:
        """Subword ids of one sentence, without BOS/EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Subword ids of many sentences (multi-threaded inside sentencepiece), without BOS/EOS."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Detokenized text of `ids`: stops at the first EOS and skips PAD and BOS.

        The text is what `encode` saw after sentencepiece's nmt_nfkc normalisation (NFKC, whitespace runs collapsed,
        no leading/trailing spaces), so `decode(encode(s)) == s` for normalised text without unknown characters.
        """
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i != PAD_ID and i != BOS_ID])

    def piece(self, token_id: int) -> str:
        """The subword string of one id (for debugging and logs)."""
        return self._sp.id_to_piece(int(token_id))


def train_vocab(sentences: Iterable[str], model_prefix: Path, vocab_size: int, character_coverage: float) -> Path:
    """Learn a BPE model on `sentences`; writes `{model_prefix}.model` and `.vocab` and returns the `.model` path.

    Empty sentences are ignored by sentencepiece. If the text is too small for `vocab_size` merges,
    raises DataError naming `data.vocab_size` and the largest value this corpus allows.
    """
    spm.set_random_generator_seed(_SAMPLING_SEED)  # the sentence sample (huge corpora only) is reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(model_prefix), model_type="bpe",
            vocab_size=vocab_size, character_coverage=character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=MAX_TRAINING_SENTENCES, shuffle_input_sentence=True, minloglevel=2,
        )
    except RuntimeError as err:
        limit = re.search(r"value <= (\d+)", str(err))
        chars = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if "sentences_.empty()" in str(err):
            raise DataError("data.train: the training text has no non-empty lines, so no vocabulary can be learned; "
                            "check data.train and data.root") from None
        if chars:
            raise DataError(f"data.vocab_size={vocab_size} is smaller than the {chars.group(1)} characters and "
                            f"special pieces the vocabulary must hold; raise data.vocab_size above "
                            f"{chars.group(1)} or lower data.character_coverage") from None
        if limit:
            raise DataError(f"data.vocab_size={vocab_size} is too large for this training data: it allows at most "
                            f"{limit.group(1)}; lower data.vocab_size or add training data") from None
        raise DataError(f"sentencepiece could not learn a BPE model with data.vocab_size={vocab_size}: {err}") from None
    logger.info("learned a joint BPE vocabulary of %d pieces", vocab_size)
    return Path(f"{model_prefix}.model")
