"""Beam search on hand-made step functions whose answers can be checked by hand, and on a tiny Transformer."""
from __future__ import annotations

import math
from functools import partial

import mxnet as mx
import numpy as np
import pytest

from dist_nmt.decode import (
    beam_search,
    coverage_penalty,
    greedy_search,
    length_penalty,
    max_output_lengths,
    repeat_states,
    translate_batch,
)

BOS, EOS = 2, 3
A, B, C, D = 4, 5, 6, 7
TINY = 1e-9  # probability of every transition not listed


def markov_step(table: dict[int, dict[int, float]], vocab: int = 8):
    """Stateless step_fn: next-token log-probs depend only on the previous token."""
    log_table = np.full((vocab, vocab), math.log(TINY))
    for prev, nxt in table.items():
        for tok, p in nxt.items():
            log_table[prev, tok] = math.log(p)

    def step(tokens, states):
        return mx.nd.array(log_table[tokens.asnumpy().astype(int)]), states, None

    return step


# BOS -> A .6 | B .4 ;  A -> C .6 | EOS .4 ;  B -> EOS 1 ;  C -> D 1 ;  D -> EOS 1
# Complete hypotheses: "B" p=.4 (2 tokens with EOS), "A C D" p=.36 (4 tokens), "A" p=.24 (2 tokens).
CHAIN = {BOS: {A: 0.6, B: 0.4}, A: {C: 0.6, EOS: 0.4}, B: {EOS: 1.0}, C: {D: 1.0}, D: {EOS: 1.0}}
# Greedy trap: BOS -> A .55 | B .45 ;  A -> C .4 | D .3 | EOS .3 ;  B -> EOS .9 | C .1 ;  C, D -> EOS 1.
# Greedy: A C (p = .55 * .4 = .22). Best: B (p = .45 * .9 = .405), found by beam 2.
TRAP = {BOS: {A: 0.55, B: 0.45}, A: {C: 0.4, D: 0.3, EOS: 0.3}, B: {EOS: 0.9, C: 0.1}, C: {EOS: 1.0},
        D: {EOS: 1.0}}


def search(table, beam, alpha=0.0, max_len=10, batch=1, nbest=1):
    return beam_search(markov_step(table), [], batch, beam, BOS, EOS, [max_len] * batch, alpha, nbest=nbest)


def test_length_penalty_matches_gnmt_formula():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(4, 1.0) == pytest.approx(1.5)
    assert length_penalty(7, 0.0) == 1.0


def test_coverage_penalty_sums_log_of_capped_coverage_over_real_words():
    coverage = np.array([0.5, 2.0, 0.25, 0.0])  # last position is padding
    assert coverage_penalty(coverage, 3, beta=0.2) == pytest.approx(0.2 * (math.log(0.5) + 0 + math.log(0.25)))
    assert coverage_penalty(coverage, 3, beta=0.0) == 0.0


def test_max_output_lengths_is_a_times_src_plus_b():
    assert max_output_lengths(np.array([10, 3]), 1.2, 10).tolist() == [22, 13]


def test_greedy_falls_into_the_trap_and_beam_two_escapes_it():
    tokens, score = greedy_search(markov_step(TRAP), [], 1, BOS, EOS, [10])[0]
    assert (tokens, score) == ([A, C], pytest.approx(math.log(0.22)))
    assert search(TRAP, beam=1)[0][0] == ([A, C], pytest.approx(math.log(0.22)))
    assert search(TRAP, beam=2)[0][0] == ([B], pytest.approx(math.log(0.405)))


def test_length_penalty_changes_the_winner():
    # alpha=0: "B" (log .4 = -0.916) beats "A C D" (log .36 = -1.022).
    assert search(CHAIN, beam=2, alpha=0.0)[0][0] == ([B], pytest.approx(math.log(0.4)))
    # alpha=1: B scores -0.916 / (7/6) = -0.785; A C D scores -1.022 / (9/6) = -0.681 and wins.
    assert search(CHAIN, beam=2, alpha=1.0)[0][0] == ([A, C, D], pytest.approx(math.log(0.36) / 1.5))


def test_nbest_is_sorted_best_first():
    hyps = search(CHAIN, beam=3, nbest=3)[0]
    assert [h[0] for h in hyps] == [[B], [A, C, D], [A]]
    assert [h[1] for h in hyps] == pytest.approx([math.log(0.4), math.log(0.36), math.log(0.24)])


def test_max_length_is_respected_per_sentence():
    loop = {tok: {A: 0.5, B: 0.3, C: 0.2} for tok in (BOS, A, B, C)}  # never ends by itself
    hyps = beam_search(markov_step(loop), [], 3, 2, BOS, EOS, [1, 4, 2], alpha=0.6)
    assert [len(h[0][0]) for h in hyps] == [1, 4, 2]
    assert hyps[1][0][0] == [A, A, A, A]


def second_order_step(vocab: int, seed: int, num_sentences: int = 2):
    """step_fn whose log-probs depend on the sentence and the last two tokens.

    states[0] (N, 2) holds the last two tokens and must be reordered with the beams; states[1] (N,) holds the
    sentence index, is the same for all beams of a sentence (static) and must only be compacted.
    """
    logits = np.random.RandomState(seed).randn(num_sentences, vocab, vocab, vocab) * 2.0
    logits[..., EOS] -= 2.5  # hypotheses of several tokens, so wrong reordering would show
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def step(tokens, states):
        prev, sent = states[0].asnumpy().astype(int), states[1].asnumpy().astype(int)
        tok = tokens.asnumpy().astype(int)
        out = log_probs[sent, prev[:, 1], tok]
        return mx.nd.array(out), [mx.nd.array(np.stack([prev[:, 1], tok], axis=1)), states[1]], None

    def score_next(sentence: int, history: list[int]) -> np.ndarray:
        padded = [BOS, BOS] + history
        return log_probs[sentence, padded[-2], padded[-1]]

    return step, score_next


def reference_beam(score_next, beam: int, max_len: int, alpha: float) -> tuple[list[int], float]:
    """Plain, unbatched beam search with the same rules, for cross-checking the vectorised one."""
    alive, finished = [([], 0.0)], []
    for t in range(max_len + 1):
        cands = []
        for hist, s in alive:
            lp = score_next(hist)
            cands += [(s + lp[v], hist, v) for v in range(len(lp))] if t < max_len else [(s + lp[EOS], hist, EOS)]
        cands.sort(key=lambda c: -c[0])
        cands = cands[:2 * beam]
        finished += [(s / length_penalty(t + 1, alpha), h) for s, h, v in cands[:beam] if v == EOS]
        finished = sorted(finished, key=lambda f: -f[0])[:beam]
        alive = [(h + [v], s) for s, h, v in cands if v != EOS][:beam]
        bound = max(alive[0][1] / length_penalty(n, alpha) for n in (t + 2, max_len + 1)) if alive else -np.inf
        if t == max_len or (len(finished) >= beam and bound <= finished[-1][0]):
            break
    return finished[0][1], finished[0][0]


@pytest.mark.parametrize("beam,alpha,seed", [(1, 0.0, 1), (2, 0.0, 5), (3, 0.0, 1), (3, 0.8, 5), (5, 1.0, 1)])
@pytest.mark.parametrize("max_lengths", [[6, 2, 4], [6, 2, 4, 5, 3, 6, 1, 4, 2, 5, 6, 6]])
def test_batched_search_with_reordered_states_matches_plain_reference(beam, alpha, seed, max_lengths):
    # Sentences stop at different steps: finished ones ride along for a while (12 sentences) or are dropped from
    # the batch at once (3 sentences), and the static state must follow that.
    num = len(max_lengths)
    step, score_next = second_order_step(vocab=7, seed=seed, num_sentences=num)
    states = repeat_states([mx.nd.full((num, 2), BOS), mx.nd.arange(num)], beam)
    hyps = beam_search(step, states, num, beam, BOS, EOS, max_lengths, alpha, static_states=(1,))
    for sentence, max_len in enumerate(max_lengths):
        expected_tokens, expected_score = reference_beam(partial(score_next, sentence), beam, max_len, alpha)
        assert hyps[sentence][0][0] == expected_tokens
        assert hyps[sentence][0][1] == pytest.approx(expected_score)


def test_beam_one_equals_greedy_on_a_tiny_transformer():
    from dist_nmt.models import TransformerHParams, build_model

    mx.random.seed(3)
    hp = TransformerHParams(num_enc_layers=2, num_dec_layers=2, d_model=32, d_ff=64, num_heads=4, dropout=0.0,
                            attention_dropout=0.0)
    model = build_model("transformer", hp, vocab_size=20)
    model.initialize()
    src = mx.nd.array(np.random.RandomState(0).randint(4, 20, size=(3, 6)))
    src_len = mx.nd.array([6, 4, 2])
    states = model.init_decode_states(model.encode(src, src_len))
    greedy = greedy_search(model.decode_step, states, 3, BOS, EOS, [8, 8, 8])
    beam = translate_batch(model, src, src_len, beam_size=1, alpha=0.0, beta=0.0, max_len_a=0.0, max_len_b=8)
    assert [b[0][0] for b in beam] == [g[0] for g in greedy]
    assert [b[0][1] for b in beam] == pytest.approx([g[1] for g in greedy], abs=1e-5)
    with_coverage = translate_batch(model, src, src_len, beam_size=4, alpha=0.6, beta=0.2, max_len_a=1.0,
                                    max_len_b=3, nbest=2)
    assert all(len(h) == 2 and h[0][1] >= h[1][1] and len(h[0][0]) <= n + 3
               for h, n in zip(with_coverage, [6, 4, 2], strict=True))
