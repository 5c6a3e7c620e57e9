"""Label-smoothed cross-entropy, summed over real target tokens.

The sum is *not* normalised here: the trainer divides by the all-reduced target-token count of the global batch
exactly once (through the optimizer's rescale), so every token weighs the same whatever rank or micro-batch it
landed on. Shapes: B batch, T target length, V vocabulary.
"""
from __future__ import annotations

import mxnet as mx


def label_smoothed_nll(logits: mx.nd.NDArray, tgt_out: mx.nd.NDArray, tgt_valid_len: mx.nd.NDArray,
                       epsilon: float) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """Return (smoothed loss sum, plain NLL sum) over positions t < tgt_valid_len.

    logits (B, T, V) float32; tgt_out (B, T) ids; tgt_valid_len (B,) float32. The smoothed loss spreads
    `epsilon` uniformly over the vocabulary (Szegedy et al.), as fairseq and Sockeye do.
    """
    log_probs = mx.nd.log_softmax(logits, axis=-1)                        # (B, T, V)
    nll = -mx.nd.pick(log_probs, tgt_out, axis=-1)                        # (B, T)
    smooth = -mx.nd.mean(log_probs, axis=-1)                              # (B, T)
    per_token = (1.0 - epsilon) * nll + epsilon * smooth
    mask = mx.nd.SequenceMask(mx.nd.ones_like(nll), sequence_length=tgt_valid_len,
                              use_sequence_length=True, axis=1)           # (B, T)
    return mx.nd.sum(per_token * mask), mx.nd.sum(nll * mask)
