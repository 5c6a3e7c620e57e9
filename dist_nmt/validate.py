"""Validation during and after training: dev loss and beam-search BLEU, sharded across ranks.

Every rank decodes its own slice of the sentences; the translations are gathered on every rank and rank 0 scores
them with sacreBLEU. So validation gets faster with more workers, and no rank waits in a collective for the whole
decode (which would trip Horovod's stall timeout on big dev sets).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import mxnet as mx
import numpy as np

from dist_nmt import distributed
from dist_nmt.config import DecodeConfig
from dist_nmt.data import Batch, BatchPlan, EncodedSplit, Vocab, collate
from dist_nmt.evaluate import sacre_scores, tokenized_bleu
from dist_nmt.loss import label_smoothed_nll
from dist_nmt.translate import translate_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeJob:
    """What to decode and how: source lines, references, beam settings."""

    sources: Sequence[str]
    references: Sequence[str]
    decode: DecodeConfig
    max_src_len: int
    tgt_lang: str = ""
    tok_references: Sequence[str] = ()


def to_nd(batch: Batch, ctx: mx.Context) -> dict[str, mx.nd.NDArray]:
    """numpy batch from `collate` → NDArrays on `ctx` (int ids stay int32)."""
    return {k: mx.nd.array(v, ctx=ctx, dtype=v.dtype) for k, v in batch.arrays().items()}


def dev_loss(model: mx.gluon.Block, split: EncodedSplit, batches: Sequence[BatchPlan], label_smoothing: float,
             ctx: mx.Context, name: str) -> dict:
    """Per-token smoothed loss and perplexity over this rank's dev batches, summed over all ranks."""
    totals = np.zeros(3)
    for plan in batches:
        batch = collate(split, plan)
        nd = to_nd(batch, ctx)
        logits = model(nd["src"], nd["src_valid_len"], nd["tgt_in"], nd["tgt_valid_len"])
        loss, nll = label_smoothed_nll(logits, nd["tgt_out"], nd["tgt_valid_len"], label_smoothing)
        totals += [loss.asscalar(), nll.asscalar(), batch.num_tgt_tokens]
    loss_sum, nll_sum, num_tgt_tokens = distributed.allreduce_sum(totals, name=name)
    num_tgt_tokens = max(num_tgt_tokens, 1.0)
    return {"loss": loss_sum / num_tgt_tokens, "ppl": float(np.exp(min(nll_sum / num_tgt_tokens, 50.0)))}


def sample_indices(num_sentences: int, sample_size: int) -> np.ndarray:
    """Evenly spaced, deterministic sample (all sentences when sample_size is 0 or large enough)."""
    if sample_size <= 0 or sample_size >= num_sentences:
        return np.arange(num_sentences)
    return np.linspace(0, num_sentences - 1, sample_size).round().astype(np.int64)


def decode_and_score(model: mx.gluon.Block, vocab: Vocab, job: DecodeJob, world: distributed.World,
                     ctx: mx.Context, name: str) -> tuple[dict, list[str]]:
    """Translate `job.sources` sharded over ranks; every rank gets the scores and all hypotheses in order."""
    mine = np.arange(world.rank, len(job.sources), world.size)
    hyps = translate_lines(model, vocab, [job.sources[i] for i in mine], job.decode,
                           job.max_src_len, ctx)
    gathered = distributed.allgather_object((mine.tolist(), hyps), name=name)
    ordered = [""] * len(job.sources)
    for indices, texts in gathered:
        for i, text in zip(indices, texts, strict=True):
            ordered[i] = text
    scores: dict = {}
    if world.is_primary:
        scores = sacre_scores(ordered, job.references)
        if job.tok_references:
            scores.update(tokenized_bleu(ordered, job.tok_references, job.tgt_lang))
    return distributed.broadcast_object(scores, name=f"{name}.scores"), ordered
