"""BLEU and chrF with sacreBLEU on detokenized text, plus the literature's tokenized lowercase BLEU.

    dist-nmt evaluate --hyp out.de --ref ../shared/data/multi30k/raw/test_2016_flickr.de.gz \
        --tok-ref ../shared/data/multi30k/tok/test_2016_flickr.lc.norm.tok.de.gz --lang de

sacreBLEU on detokenized output is the number to trust and quote (with its signature). Multi30k papers instead
report BLEU on lowercased, punctuation-normalised, Moses-tokenised text (the task's `task1-tokenize.sh`); we
reproduce that tokenisation with sacremoses and score it with sacreBLEU's `tokenize='none'` (= multi-bleu.perl).
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import sacrebleu


def sacre_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus BLEU and chrF of detokenized hypotheses against one reference each, with signatures."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: files must be line-aligned")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(list(hyps), [list(refs)])
    chrf_score = chrf.corpus_score(list(hyps), [list(refs)])
    return {
        "bleu": round(bleu_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf_score.score, 2),
        "chrf_signature": str(chrf.get_signature()),
    }


def moses_tokenize_lc(lines: Sequence[str], lang: str) -> list[str]:
    """Multi30k's task1-tokenize.sh: normalise punctuation, Moses-tokenise (escaped), lowercase.

    Idempotent on its own output: Moses' escapes (`&quot;`, `&apos;`, ...) are undone first, so hypotheses of a model
    trained on the already tokenised files are not escaped twice (`&amp;quot;`).
    """
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    normalizer, tokenizer = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(normalizer.normalize(html.unescape(line)), return_str=True, escape=True).lower()
            for line in lines]


def tokenized_bleu(hyps: Sequence[str], tok_refs: Sequence[str], lang: str) -> dict:
    """BLEU of Moses-tokenised lowercased hypotheses against already tokenised references (multi-bleu style)."""
    if len(hyps) != len(tok_refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(tok_refs)} tokenized references")
    bleu = sacrebleu.metrics.BLEU(tokenize="none", force=True)
    score = bleu.corpus_score(moses_tokenize_lc(hyps, lang), [list(tok_refs)])
    return {"tok_bleu": round(score.score, 2), "tok_bleu_signature": str(bleu.get_signature())}
