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
from dist_nmt.config import DecodeConfig
from dist_nmt.data import BatchPlan, EncodedSplit, RunData, Vocab, collate, read_lines
from dist_nmt.data.testsets import TestSet
from dist_nmt.evaluate import sacre_scores, tokenized_bleu
from dist_nmt.step import forward_loss, to_nd
from dist_nmt.translate import translate_lines

log = logging.getLogger(__name__)


def dev_loss(model: mx.gluon.Block, split: EncodedSplit, batches: Sequence[BatchPlan], label_smoothing: float,
             ctx: mx.Context, name: str, fused_loss: bool = False) -> dict:
    """Per-token smoothed loss and perplexity over this rank's dev batches, summed over all ranks (`fused_loss`:
    the training loss's fused op, see `dist_nmt.step.forward_loss`)."""
    totals = np.zeros(3)
    for plan in batches:
        batch = collate(split, plan)
        loss, nll = forward_loss(model, to_nd(batch, ctx), label_smoothing, fused_loss)
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
    fused_loss: bool = False  # the dev loss through the fused op, as training computes it

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
        values = dev_loss(self.model, data.dev, data.dev_batches, label_smoothing, self.ctx, name=f"devloss.{update}",
                          fused_loss=self.fused_loss)
        sample = sample_indices(len(data.dev_sources), sample_sentences)
        scores, _ = self.score([data.dev_sources[i] for i in sample], [data.dev_references[i] for i in sample],
                               name=f"devbleu.{update}")
        values.update(bleu=scores["bleu"], bleu_signature=scores["bleu_signature"], seconds=time.time() - t0,
                      sentences=len(sample))
        return values


def score_test_set(validator: Validator, test_set: TestSet, tgt_lang: str, run_dir: str | Path,
                   model: str) -> dict:
    """Decode one whole test set, write its hypothesis file, log its TEST line; return its scores (every rank).

    The `data.test` set writes `test.hyp.<tgt_lang>`, the others `test.<name>.hyp.<tgt_lang>`. `model` says which
    model decoded it (see final_model.Choice.describe).
    """
    tok_refs = list(read_lines(test_set.tok_ref)) if test_set.tok_ref else []
    t0 = time.time()
    scores, hyps = validator.score(list(read_lines(test_set.src)), list(read_lines(test_set.ref)),
                                   name=f"test.{test_set.name}", tok_references=tok_refs, tgt_lang=tgt_lang)
    scores.update(test_set=test_set.name, sentences=len(hyps), decode_seconds=round(time.time() - t0, 1))
    if validator.world.is_primary:
        stem = "test" if test_set.is_primary else f"test.{test_set.name}"
        (Path(run_dir) / f"{stem}.hyp.{tgt_lang}").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        tok = f" | tokenized lowercase BLEU {scores['tok_bleu']:.2f}" if "tok_bleu" in scores else ""
        log.info("TEST %s (%s; %d sentences): sacreBLEU %.2f | chrF %.2f%s | %s", test_set.src.name, model,
                 len(hyps), scores["bleu"], scores["chrf"], tok, scores["bleu_signature"])
    return scores


def write_test_scores(run_dir: str | Path, per_set: list[dict], model: str, dev_bleu: dict) -> dict:
    """`test_scores.json`: the `data.test` set's scores at the top level (as before extra test sets existed), the
    model that produced them, every candidate's dev BLEU, and each extra set under `extra_tests`."""
    first, *extra = per_set
    out = {**first, "model": model, "candidates_dev_bleu": dev_bleu,
           "extra_tests": {s["test_set"]: s for s in extra}}
    (Path(run_dir) / "test_scores.json").write_text(json.dumps(out, indent=1))
    return out
