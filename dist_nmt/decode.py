"""Batched beam search (and greedy search) over any `step_fn`; never imports a model.

Shapes: B sentences in the batch, n sentences still searching, K beam, V vocab, S source length.

    step_fn(tokens (N,), states) -> (log_probs (N, V), new_states, attn (N, S) or None)

States are lists of batch-first NDArrays. The caller repeats them K times (`repeat_states`), so row b*K + k is
beam k of sentence b; the search reorders them with `take` along axis 0 and drops the rows of finished sentences,
so later steps only compute for sentences still searching.

Scoring (GNMT, Wu et al. 2016): a finished hypothesis y of source x scores
    log P(y|x) / lp(|y|) + cp(x; y),   lp(n) = ((5 + n) / 6) ** alpha,
    cp = beta * sum_{source positions j} log(min(sum_t attn_tj, 1.0)),
where |y| counts the generated tokens including EOS. Alive beams are ranked by log P (they all have the same
length). An EOS candidate finishes a hypothesis only if it ranks within the top K candidates of its sentence (so
K=1 is exactly greedy decoding when alpha=0 and beta=0). A sentence stops when it has K finished hypotheses and its
best alive beam cannot beat the K-th of them even at its longest allowed length, or when it reaches its maximum
output length `max_lengths[b]` (tokens before EOS), where EOS is forced.

    hyps = translate_batch(model, src, src_valid_len, beam_size=4, alpha=0.6, beta=0.0, max_len_a=1.2, max_len_b=10)
    best_tokens, best_score = hyps[0][0]
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mxnet as mx
import numpy as np

logger = logging.getLogger(__name__)

StepFn = Callable[[mx.nd.NDArray, list], tuple]
Hypothesis = tuple[list[int], float]  # (token ids without BOS/EOS, score)
COVERAGE_FLOOR = 1e-10  # keeps log(coverage) finite for source words that got no attention at all
COMPACT_FRACTION = 0.125  # drop finished sentences from the batch once they are this share of it


def length_penalty(length, alpha: float):
    """GNMT length penalty ((5 + length) / 6) ** alpha (scalar or numpy array)."""
    return ((5.0 + np.asarray(length, dtype=np.float64)) / 6.0) ** alpha


def coverage_penalty(coverage: np.ndarray, src_length: int, beta: float) -> float:
    """GNMT coverage penalty beta * sum_{j < src_length} log(min(coverage_j, 1)); coverage (S,)."""
    if not beta:
        return 0.0
    covered = np.clip(coverage[:src_length], COVERAGE_FLOOR, 1.0)
    return float(beta * np.log(covered).sum())


def max_output_lengths(src_lengths: np.ndarray, max_len_a: float, max_len_b: int) -> np.ndarray:
    """Per-sentence cap on output tokens (before EOS): floor(a * src_len + b), at least 1."""
    return np.maximum(np.floor(max_len_a * np.asarray(src_lengths, dtype=np.float64) + max_len_b), 1).astype(int)


def repeat_states(states: list, k: int) -> list:
    """Repeat every batch-first state K times along axis 0: row b -> rows b*K .. b*K+K-1."""
    return [mx.nd.repeat(s, repeats=k, axis=0) for s in states]


def take_rows(states: list, rows: np.ndarray, skip: Sequence[int] = ()) -> list:
    """states[i][rows] along axis 0, except the indices in `skip` (returned unchanged)."""
    if not states:
        return states
    index = mx.nd.array(rows, ctx=states[0].context, dtype="int32")
    return [s if i in skip else mx.nd.take(s, index, axis=0) for i, s in enumerate(states)]


def states_context(states: list):
    """Context for new step inputs: that of the states (CPU when there are none)."""
    return states[0].context if states else mx.cpu()


def greedy_search(step_fn: StepFn, states: list, batch_size: int, bos_id: int, eos_id: int,
                  max_lengths: Sequence[int]) -> list[Hypothesis]:
    """Argmax decoding (states not repeated). Returns per sentence (tokens, sum of log-probs incl. EOS)."""
    max_lengths = np.asarray(max_lengths, dtype=int)
    tokens = [[] for _ in range(batch_size)]
    scores = np.zeros(batch_size)
    alive = np.ones(batch_size, dtype=bool)
    step_input = mx.nd.full((batch_size,), bos_id, ctx=states_context(states))
    for t in range(int(max_lengths.max()) + 1):
        log_probs, states, _ = step_fn(step_input, states)
        log_probs = log_probs.asnumpy()
        best = log_probs.argmax(axis=1)
        best[t >= max_lengths] = eos_id  # forced EOS at the length cap
        for b in np.flatnonzero(alive):
            scores[b] += log_probs[b, best[b]]
            if best[b] == eos_id:
                alive[b] = False
            else:
                tokens[b].append(int(best[b]))
        if not alive.any():
            break
        step_input = mx.nd.array(best, ctx=states_context(states))
    return [(tokens[b], float(scores[b])) for b in range(batch_size)]


@dataclass
class _Search:
    """Book-keeping of the sentences still searching (numpy, n = number of such sentences)."""

    sent_ids: np.ndarray  # (n,) original sentence index
    scores: np.ndarray  # (n, K) cumulative log-probs of alive beams
    history: np.ndarray  # (n, K, t) generated tokens
    max_lengths: np.ndarray  # (n,)
    coverage: np.ndarray | None  # (n, K, S) summed attention, only when beta > 0
    frozen: np.ndarray  # (n,) done, but still in the batch until enough are done to compact
    finished: list[list[tuple[float, list[int]]]] = field(default_factory=list)  # per original sentence


def _start(batch_size: int, k: int, max_lengths: np.ndarray) -> _Search:
    scores = np.full((batch_size, k), -np.inf)
    scores[:, 0] = 0.0  # all K beams start identical: expand only the first
    return _Search(np.arange(batch_size), scores, np.zeros((batch_size, k, 0), dtype=np.int64),
                   max_lengths.copy(), None, np.zeros(batch_size, dtype=bool), [[] for _ in range(batch_size)])


def _top_candidates(log_probs, scores: np.ndarray, k: int):
    """Best 2K (score, beam, token) per sentence over all K*V expansions: each (n, 2K), best first.

    The sentence's best 2K are among the best 2K of each of its beams, so a per-row top-k of the log-probs
    (no pass adding the beam scores over the whole (n*K, V) array) and a tiny numpy merge suffice.
    """
    n, vocab = scores.shape[0], log_probs.shape[1]
    top = min(2 * k, vocab)
    values, tokens = mx.nd.topk(log_probs, axis=1, k=top, ret_typ="both", dtype="int32")  # (n*K, 2K)
    values = values.asnumpy().astype(np.float64).reshape(n, k * top) + np.repeat(scores, top, axis=1)
    tokens = tokens.asnumpy().reshape(n, k * top)
    best = np.argsort(-values, axis=1, kind="stable")[:, :2 * k]  # (n, 2K)
    return (np.take_along_axis(values, best, axis=1), best // top,
            np.take_along_axis(tokens, best, axis=1).astype(np.int64))


def _forced_eos(log_probs, scores: np.ndarray, rows: np.ndarray, eos_id: int, k: int):
    """Candidates for sentences at their length cap: each beam + EOS (n_rows, K), others -inf."""
    eos_lp = log_probs[:, eos_id].asnumpy().reshape(-1, k)[rows]  # (n_rows, K)
    values = np.concatenate([scores[rows] + eos_lp, np.full_like(eos_lp, -np.inf)], axis=1)
    beams = np.tile(np.arange(2 * k) % k, (len(rows), 1))
    tokens = np.full(values.shape, eos_id)
    tokens[:, k:] = eos_id + 1  # placeholders with -inf score, never chosen
    return values, beams, tokens


def _finish(search: _Search, i: int, beam: int, value: float, length: int, alpha: float, beta: float,
            src_lengths: np.ndarray | None, k: int) -> None:
    """Record hypothesis (sentence i, beam) ending in EOS at total length `length` (incl. EOS)."""
    sent = search.sent_ids[i]
    score = value / float(length_penalty(length, alpha))
    if search.coverage is not None:
        score += coverage_penalty(search.coverage[i, beam], int(src_lengths[sent]), beta)
    done = search.finished[sent]
    done.append((score, search.history[i, beam].tolist()))
    done.sort(key=lambda h: -h[0])
    del done[k:]


def _cannot_improve(search: _Search, i: int, best_alive: float, t: int, alpha: float, k: int) -> bool:
    """True if sentence i has K finished hypotheses none of which its best alive beam can still beat."""
    done = search.finished[search.sent_ids[i]]
    if len(done) < k:
        return False
    lengths = np.array([t + 2, search.max_lengths[i] + 1])  # shortest and longest final lengths incl. EOS
    bound = float(np.max(best_alive / length_penalty(lengths, alpha)))
    return bound <= done[-1][0]


def _advance(search: _Search, values: np.ndarray, beams: np.ndarray, tokens: np.ndarray, eos_id: int, k: int):
    """Keep the best K non-EOS candidates per sentence as the new alive beams; returns their (beams, tokens)."""
    order = np.argsort(tokens == eos_id, axis=1, kind="stable")[:, :k]  # (n, K) non-EOS first, rank order kept
    new_beams = np.take_along_axis(beams, order, axis=1)
    new_tokens = np.take_along_axis(tokens, order, axis=1)
    search.scores = np.take_along_axis(values, order, axis=1)
    rows = np.arange(len(search.sent_ids))[:, None]
    search.history = np.concatenate([search.history[rows, new_beams], new_tokens[:, :, None]], axis=2)
    if search.coverage is not None:
        search.coverage = search.coverage[rows, new_beams]
    return new_beams, new_tokens


def _check_args(beam_size: int, nbest: int, beta: float, src_lengths) -> None:
    if beam_size < 1 or not 1 <= nbest <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size, got beam_size={beam_size}, "
                         f"nbest={nbest}")
    if beta < 0:
        raise ValueError(f"coverage penalty beta must be >= 0, got {beta}")
    if beta and src_lengths is None:
        raise ValueError("beta > 0 needs src_lengths (the coverage penalty sums over real source words)")


def beam_search(step_fn: StepFn, states: list, batch_size: int, beam_size: int, bos_id: int, eos_id: int,
                max_lengths: Sequence[int], alpha: float, beta: float = 0.0, src_lengths: Sequence[int] | None = None,
                nbest: int = 1, static_states: Sequence[int] = ()) -> list[list[Hypothesis]]:
    """Beam search; `states` already repeated K times (`repeat_states`).

    `static_states` lists state indices that are identical for all beams of a sentence (e.g. encoder memory):
    they are never reordered, only compacted when sentences finish. Returns, per sentence, up to `nbest`
    (token ids without BOS/EOS, score) best first.
    """
    _check_args(beam_size, nbest, beta, src_lengths)
    k = beam_size
    search = _start(batch_size, k, np.asarray(max_lengths, dtype=int))
    src_lengths = None if src_lengths is None else np.asarray(src_lengths, dtype=int)
    tokens = mx.nd.full((batch_size * k,), bos_id, ctx=states_context(states))
    for t in range(int(search.max_lengths.max()) + 1):
        log_probs, states, attn = step_fn(tokens, states)
        if beta and attn is not None:
            step_attn = attn.asnumpy().reshape(len(search.sent_ids), k, -1)  # (n, K, S)
            search.coverage = step_attn if search.coverage is None else search.coverage + step_attn
        values, beams, toks = _top_candidates(log_probs, search.scores, k)
        forced = t >= search.max_lengths
        if forced.any():
            rows = np.flatnonzero(forced)
            values[rows], beams[rows], toks[rows] = _forced_eos(log_probs, search.scores, rows, eos_id, k)
        live = ~search.frozen
        for i, r in np.argwhere((toks[:, :k] == eos_id) & np.isfinite(values[:, :k]) & live[:, None]):
            _finish(search, i, beams[i, r], values[i, r], t + 1, alpha, beta, src_lengths, k)
        new_beams, new_tokens = _advance(search, values, beams, toks, eos_id, k)
        search.frozen |= live & (forced | np.array([_cannot_improve(search, i, search.scores[i, 0], t, alpha, k)
                                                    for i in range(len(live))], dtype=bool))
        if search.frozen.all():
            break
        # Dropping rows changes the step's input shapes (new oneDNN primitives, new memory plan), so finished
        # sentences ride along until they make up a good share of the batch.
        compact = search.frozen.sum() >= COMPACT_FRACTION * len(live)
        keep = ~search.frozen if compact else np.ones(len(live), dtype=bool)
        states, tokens = _compact(search, states, new_beams, new_tokens, keep, k, static_states)
    logger.debug("beam search: %d sentences, beam %d, %d steps", batch_size, k, t + 1)
    return [[(hyp, score) for score, hyp in done_list[:nbest]] for done_list in search.finished]


def _compact(search: _Search, states: list, new_beams: np.ndarray, new_tokens: np.ndarray, keep: np.ndarray,
             k: int, static_states: Sequence[int]):
    """Reorder states to the new beams and drop finished sentences; returns (states, next step tokens)."""
    kept = np.flatnonzero(keep)
    rows = (kept[:, None] * k + new_beams[kept]).reshape(-1)  # (n_kept*K,) source row of every new beam
    if len(kept) == len(keep):
        states = take_rows(states, rows, skip=static_states)
    else:
        sentence_rows = (kept[:, None] * k + np.arange(k)).reshape(-1)
        moved = take_rows(states, rows, skip=static_states)
        states = [take_rows([s], sentence_rows)[0] if i in static_states else moved[i]
                  for i, s in enumerate(states)]
        search.sent_ids, search.scores = search.sent_ids[kept], search.scores[kept]
        search.history, search.max_lengths = search.history[kept], search.max_lengths[kept]
        search.frozen = search.frozen[kept]
        if search.coverage is not None:
            search.coverage = search.coverage[kept]
    tokens = mx.nd.array(new_tokens[kept].reshape(-1), ctx=states_context(states))
    return states, tokens


def translate_batch(model, src, src_valid_len, beam_size: int, alpha: float, beta: float, max_len_a: float,
                    max_len_b: int, nbest: int = 1, bos_id: int = 2, eos_id: int = 3) -> list[list[Hypothesis]]:
    """Encode a batch, beam-search it, return per sentence up to `nbest` (token ids, score) best first.

    src (B, S) token ids, src_valid_len (B,). Output length cap per sentence: floor(a * src_len + b).
    """
    src_lengths = src_valid_len.asnumpy().astype(int)
    max_lengths = max_output_lengths(src_lengths, max_len_a, max_len_b)
    states = model.init_decode_states(model.encode(src, src_valid_len))
    states = repeat_states(states, beam_size)
    return beam_search(model.decode_step, states, src.shape[0], beam_size, bos_id, eos_id, max_lengths, alpha,
                       beta=beta, src_lengths=src_lengths, nbest=nbest,
                       static_states=getattr(model, "static_decode_states", ()))
