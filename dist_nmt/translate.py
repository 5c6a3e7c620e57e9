"""Translate raw text lines with a trained model: encode, batch by length, beam search, detokenize.

    dist-nmt translate --run-dir runs/multi30k < test.en > test.de
    dist-nmt translate --run-dir runs/multi30k --input test.en --output test.de --beam 10 --nbest 3

Exactly one output line per input line (n-best: `nbest` lines per input, `index ||| text ||| score`). Empty
inputs give empty outputs; inputs longer than `max_src_len` subwords are truncated with a warning, never a crash.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import mxnet as mx
import numpy as np

from dist_nmt.config import DecodeConfig
from dist_nmt.data.vocab import EOS_ID, PAD_ID, Vocab
from dist_nmt.decode import translate_batch

log = logging.getLogger(__name__)


_BEAM_KEYS = ("beam_size", "alpha", "beta", "max_len_a", "max_len_b", "nbest")


def encode_sources(vocab: Vocab, lines: Sequence[str], max_src_len: int) -> list[list[int]]:
    """Subword ids per line, truncated to `max_src_len - 1` (room for EOS) with a warning per truncated line."""
    encoded = vocab.encode_batch([line.strip() for line in lines])
    for i, ids in enumerate(encoded):
        if len(ids) > max_src_len - 1:
            log.warning("input line %d has %d subwords; truncated to %d", i + 1, len(ids), max_src_len - 1)
            encoded[i] = ids[: max_src_len - 1]
    return encoded


def _pad(batch: list[list[int]], ctx: mx.Context) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    lengths = [len(ids) + 1 for ids in batch]
    width = -(-max(lengths) // 8) * 8  # round up to a multiple of 8: few distinct shapes
    src = np.full((len(batch), width), PAD_ID, dtype=np.int32)
    for row, ids in enumerate(batch):
        src[row, : len(ids) + 1] = ids + [EOS_ID]
    return mx.nd.array(src, ctx=ctx, dtype=np.int32), mx.nd.array(lengths, ctx=ctx, dtype=np.float32)


def translate_ids(model: mx.gluon.Block, sources: list[list[int]], decode: DecodeConfig,
                  ctx: mx.Context) -> list[list[tuple[list[int], float]]]:
    """N-best (ids, score) per source, in input order; empty sources get an empty hypothesis."""
    results: list[list[tuple[list[int], float]]] = [[([], 0.0)] for _ in sources]
    order = sorted((i for i, ids in enumerate(sources) if ids), key=lambda i: len(sources[i]))
    beam = {key: getattr(decode, key) for key in _BEAM_KEYS}
    for start in range(0, len(order), decode.batch_sentences):
        chunk = order[start: start + decode.batch_sentences]
        src, src_valid_len = _pad([sources[i] for i in chunk], ctx)
        for i, hyps in zip(chunk, translate_batch(model, src, src_valid_len, **beam), strict=True):
            results[i] = hyps
    return results


def translate_lines(model: mx.gluon.Block, vocab: Vocab, lines: Sequence[str], decode: DecodeConfig,
                    max_src_len: int, ctx: mx.Context) -> list[str]:
    """Best detokenized translation per input line (the list has exactly len(lines) entries)."""
    hyps = translate_ids(model, encode_sources(vocab, lines, max_src_len), decode, ctx)
    return [vocab.decode(nbest[0][0]) for nbest in hyps]


def format_nbest(index: int, nbest: list[tuple[list[int], float]], vocab: Vocab) -> list[str]:
    """Moses-style n-best lines: `index ||| text ||| score`."""
    return [f"{index} ||| {vocab.decode(ids)} ||| {score:.4f}" for ids, score in nbest]
