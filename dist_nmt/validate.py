"""Validation during and after training: dev loss and beam-search BLEU, and the final test decode, sharded across
ranks.

Every rank decodes its own slice of the sentences; the translations are gathered on every rank and rank 0 scores
them with sacreBLEU. So validation gets faster with more workers, and no rank waits in a collective for the whole
decode (which would trip Horovod's stall timeout on big dev sets).

    validator = Validator(model, data.vocab, world, ctx, cfg.decode, max_src_len=cfg.data.max_len)
    values = validator.dev(data, label_smoothing=0.1, sample_sentences=300, update=1000)   # loss, ppl, bleu, ...
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
import numpy as np

from dist_nmt import distributed
from dist_nmt.config import DataConfig, DecodeConfig
from dist_nmt.data import BatchPlan, EncodedSplit, RunData, Vocab, collate, read_lines, split_paths
from dist_nmt.evaluate import sacre_scores, tokenized_bleu
from dist_nmt.step import forward_loss, to_nd
from dist_nmt.translate import translate_lines

log = logging.getLogger(__name__)


def dev_loss(model: mx.gluon.Block, split: EncodedSplit, batches: Sequence[BatchPlan], label_smoothing: float,
             ctx: mx.Context, name: str) -> dict:
    """Per-token smoothed loss and perplexity over this rank's dev batches, summed over all ranks."""
    totals = np.zeros(3)
    for plan in batches:
        batch = collate(split, plan)
        loss, nll = forward_loss(model, to_nd(batch, ctx), label_smoothing)
        totals += [loss.asscalar(), nll.asscalar(), batch.num_tgt_tokens]
    loss_sum, nll_sum, num_tgt_tokens = distributed.allreduce_sum(totals, name=name)
    num_tgt_tokens = max(num_tgt_tokens, 1.0)
    return {"loss": loss_sum / num_tgt_tokens, "ppl": float(np.exp(min(nll_sum / num_tgt_tokens, 50.0)))}


def sample_indices(num_sentences: int, sample_size: int) -> np.ndarray:
    """Evenly spaced, deterministic sample (all sentences when sample_size is 0 or large enough)."""
    if sample_size <= 0 or sample_size >= num_sentences:
        return np.arange(num_sentences)
    return np.linspace(0, num_sentences - 1, sample_size).round().astype(np.int64)


@dataclass
class Validator:
    """Decodes and scores one model on every rank alike (all its methods are collectives)."""

    model: mx.gluon.Block
    vocab: Vocab
    world: distributed.World
    ctx: mx.Context
    decode: DecodeConfig
    max_src_len: int

    def translate(self, sources: Sequence[str], name: str) -> list[str]:
        """Best translation of every source line, decoded sharded over ranks; every rank gets all, in order."""
        mine = np.arange(self.world.rank, len(sources), self.world.size)
        hyps = translate_lines(self.model, self.vocab, [sources[i] for i in mine], self.decode, self.max_src_len,
                               self.ctx)
        ordered = [""] * len(sources)
        for indices, texts in distributed.allgather_object((mine.tolist(), hyps), name=name):
            for i, text in zip(indices, texts, strict=True):
                ordered[i] = text
        return ordered

    def score(self, sources: Sequence[str], references: Sequence[str], name: str, tok_references: Sequence[str] = (),
              tgt_lang: str = "") -> tuple[dict, list[str]]:
        """Translate and score with sacreBLEU (+ tokenized BLEU when tokenized references are given)."""
        hyps = self.translate(sources, name)
        scores: dict = {}
        if self.world.is_primary:
            scores = sacre_scores(hyps, references)
            if tok_references:
                scores.update(tokenized_bleu(hyps, tok_references, tgt_lang))
        return distributed.broadcast_object(scores, name=f"{name}.scores"), hyps

    def dev(self, data: RunData, label_smoothing: float, sample_sentences: int, update: int) -> dict:
        """Dev loss over the whole dev set and BLEU on a bounded, evenly spaced sample of it."""
        t0 = time.time()
        values = dev_loss(self.model, data.dev, data.dev_batches, label_smoothing, self.ctx, name=f"devloss.{update}")
        sample = sample_indices(len(data.dev_sources), sample_sentences)
        scores, _ = self.score([data.dev_sources[i] for i in sample], [data.dev_references[i] for i in sample],
                               name=f"devbleu.{update}")
        values.update(bleu=scores["bleu"], bleu_signature=scores["bleu_signature"], seconds=time.time() - t0,
                      sentences=len(sample))
        return values


def score_test_split(validator: Validator, data: DataConfig, run_dir: str | Path, model_name: str) -> dict:
    """Decode the whole test split, write `test.hyp.<tgt_lang>` and `test_scores.json`, log the TEST line."""
    src_path, tgt_path = split_paths(data, "test")
    tok_refs = list(read_lines(Path(data.root) / data.test_tok_ref)) if data.test_tok_ref else []
    t0 = time.time()
    scores, hyps = validator.score(list(read_lines(src_path)), list(read_lines(tgt_path)), name="test.decode",
                                   tok_references=tok_refs, tgt_lang=data.tgt_lang)
    scores.update(model=model_name, sentences=len(hyps), decode_seconds=round(time.time() - t0, 1))
    if validator.world.is_primary:
        out = Path(run_dir) / f"test.hyp.{data.tgt_lang}"
        out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        (Path(run_dir) / "test_scores.json").write_text(json.dumps(scores, indent=1))
        tok = f" | tokenized lowercase BLEU {scores['tok_bleu']:.2f}" if "tok_bleu" in scores else ""
        log.info("TEST %s (%s model, %d sentences): sacreBLEU %.2f | chrF %.2f%s | %s", src_path.name,
                 model_name, len(hyps), scores["bleu"], scores["chrf"], tok, scores["bleu_signature"])
    return scores
