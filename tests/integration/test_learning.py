"""Tiny models really learn: reversing word sequences reaches BLEU >= 90 on held-out sentences (Transformer, GNMT)."""
import json
import random

import pytest

from support import PYTHON, run_cli, train

WORDS = ("apple river stone cloud tiger music green house light paper seven table water north dream "
         "glass piano storm horse lemon").split()


def _write_reverse_corpus(root, sizes: dict[str, int], seed: int = 0) -> None:
    rng = random.Random(seed)
    for split, count in sizes.items():
        src, tgt = [], []
        for _ in range(count):
            words = rng.sample(WORDS, rng.randint(3, 8))
            src.append(" ".join(words))
            tgt.append(" ".join(reversed(words)))
        (root / f"{split}.src").write_text("\n".join(src) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(tgt) + "\n")


@pytest.fixture(scope="module")
def reverse_data(tmp_path_factory) -> list[str]:
    """Overrides pointing the tiny config at a prepared synthetic reversal corpus."""
    root = tmp_path_factory.mktemp("reverse")
    _write_reverse_corpus(root, {"train": 6000, "dev": 100, "test": 200})
    data = [f"data.root={root}", "data.src_lang=src", "data.tgt_lang=tgt", "data.train=train", "data.dev=dev",
            "data.test=test", "data.test_tok_ref=", f"data.prepared_dir={root / 'bin'}", "data.vocab_size=64",
            "data.max_len=32"]
    run_cli([PYTHON, "-m", "dist_nmt.cli", "prepare", "--config", "configs/tiny.yaml", *data])
    return data


def _test_bleu(tmp_path, overrides: list[str]) -> float:
    run = tmp_path / "run"
    train([*overrides, f"train.run_dir={run}", "train.max_tokens=1024", "optim.label_smoothing=0",
           "train.eval_sample_sentences=50", "decode.beam_size=4"])
    return json.loads((run / "test_scores.json").read_text())["bleu"]


def test_tiny_transformer_learns_to_reverse(tmp_path, reverse_data):
    # 1200 updates, not 800: at 800 the test BLEU depended on the seed and batch order (measured 76-96 over seeds and
    # the two batch planners); at 1200 seed 1 scored 94.3 with the current planner.
    bleu = _test_bleu(tmp_path, [*reverse_data, "train.max_updates=1200", "optim.lr=0.002", "optim.warmup_updates=150",
                                 "model.transformer.dropout=0", "train.eval_every_updates=400",
                                 "train.save_every_updates=400"])
    assert bleu >= 90


def test_tiny_gnmt_learns_to_reverse(tmp_path, reverse_data):
    gnmt = ["model.arch=gnmt", "model.gnmt.hidden_size=128", "model.gnmt.embed_size=128",
            "model.gnmt.residual_from_layer=2", "model.gnmt.dropout=0"]
    bleu = _test_bleu(tmp_path, [*reverse_data, *gnmt, "train.max_updates=1200", "optim.lr=0.003",
                                 "optim.warmup_updates=100", "train.eval_every_updates=400",
                                 "train.save_every_updates=400"])
    assert bleu >= 90
