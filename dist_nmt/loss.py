"""Label-smoothed cross-entropy, summed over real target tokens.

The sum is *not* normalised here: the trainer divides by the all-reduced target-token count of the global batch
exactly once (through the optimizer's rescale), so every token weighs the same whatever rank or micro-batch it
landed on. Shapes: B batch, T target length, V vocabulary.
"""
from __future__ import annotations

import mxnet as mx

from dist_nmt.models.exact import fully_connected


def label_smoothed_nll(logits: mx.nd.NDArray, tgt_out: mx.nd.NDArray, tgt_valid_len: mx.nd.NDArray,
                       epsilon: float) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """Return (smoothed loss sum, plain NLL sum) over positions t < tgt_valid_len.

    logits (B, T, V) float32 (float16 / bfloat16 under AMP: log_softmax is on AMP's fp32 list, which casts them, and
    everything after it stays float32); tgt_out (B, T) ids; tgt_valid_len (B,) float32. The smoothed loss spreads
    `epsilon` uniformly over the vocabulary (Szegedy et al.), as fairseq and Sockeye do.

    This form is also the fastest measured here: one fused SoftmaxOutput with the same gradient (smooth_alpha, loss
    values recovered from its probabilities) took 109 ms forward + backward against 68 ms at 128x32x8000 logits
    (2 threads; 205 vs 122 ms on one), so it is the pure-MXNet training loss (`model.fused_ops=off`, GPU);
    `fused_label_smoothed_nll` replaces it when the fused ops are on.
    """
    vocab = logits.shape[-1]
    log_probs = mx.nd.log_softmax(logits, axis=-1)                        # (B, T, V)
    nll = -mx.nd.pick(log_probs, tgt_out, axis=-1)                        # (B, T)
    # The mean over the vocabulary as a (V -> 1) product: oneDNN runs it multithreaded, where mx.nd.mean is a
    # single-threaded reduction (55 ms vs ~2 ms at 3200 x 8000, transformer_base bench).
    # exact.fully_connected: under AMP a plain FullyConnected would round the log-probabilities to 16 bits first.
    row_mean = mx.nd.full((1, vocab), 1.0 / vocab, ctx=logits.context, dtype=log_probs.dtype)
    smooth = -fully_connected(mx.nd, log_probs, row_mean, 1)
    smooth = mx.nd.reshape(smooth, shape=(0, 0))                          # (B, T)
    per_token = (1.0 - epsilon) * nll + epsilon * smooth
    mask = mx.nd.SequenceMask(mx.nd.ones_like(nll), sequence_length=tgt_valid_len,
                              use_sequence_length=True, axis=1)           # (B, T)
    return mx.nd.sum(per_token * mask), mx.nd.sum(nll * mask)


def fused_label_smoothed_nll(logits: mx.nd.NDArray, tgt_out: mx.nd.NDArray, tgt_valid_len: mx.nd.NDArray,
                             epsilon: float) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """`label_smoothed_nll` as one fused op per row (`dn_smoothed_nll`, needs `dist_nmt.ops.load()` first).

    Same contract and values. Its backward recomputes the softmax from the logits, so besides the logits and their
    gradient nothing of size (B, T, V) is kept: at WMT vocabularies (V = 32k) that bounds the loss's memory to two
    logit-sized buffers instead of the log-probabilities, the smoothing product and their gradients.
    """
    logits = logits.astype("float32", copy=False)  # the op is fp32-only (bf16 AMP may hand it bf16 logits)
    per_token, nll, _ = mx.nd.dn_smoothed_nll(logits, tgt_out.astype("float32", copy=False), eps=epsilon)  # (B, T)
    mask = mx.nd.SequenceMask(mx.nd.ones_like(nll), sequence_length=tgt_valid_len,
                              use_sequence_length=True, axis=1)           # (B, T)
    return mx.nd.sum(per_token * mask), mx.nd.sum(nll * mask)

