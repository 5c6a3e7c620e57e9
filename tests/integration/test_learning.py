"""A tiny Transformer really learns: reversing word sequences reaches BLEU >= 90 on held-out sentences."""
import json
import random

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


def test_tiny_transformer_learns_to_reverse(tmp_path):
    _write_reverse_corpus(tmp_path, {"train": 6000, "dev": 100, "test": 200})
    data = [f"data.root={tmp_path}", "data.src_lang=src", "data.tgt_lang=tgt", "data.train=train",
            "data.dev=dev", "data.test=test", "data.test_tok_ref=", f"data.prepared_dir={tmp_path / 'bin'}",
            "data.vocab_size=64", "data.max_len=32"]
    run_cli([PYTHON, "-m", "dist_nmt.cli", "prepare", "--config", "configs/tiny.yaml", *data])
    run = tmp_path / "run"
    train([*data, f"train.run_dir={run}", "train.max_updates=800", "train.max_tokens=1024",
           "optim.lr=0.002", "optim.warmup_updates=150", "optim.label_smoothing=0", "model.transformer.dropout=0",
           "train.eval_every_updates=400", "train.save_every_updates=400", "train.eval_sample_sentences=50",
           "decode.beam_size=4"])
    scores = json.loads((run / "test_scores.json").read_text())
    assert scores["bleu"] >= 90, scores
