"""Translation models behind one contract, chosen by name.

    from dist_nmt.models import build_model
    model = build_model("transformer", TransformerHParams(), vocab_size=8000)

Every model is a HybridBlock (hybridizable with `static_alloc=True`) with deterministic parameter names
(explicit prefixes), offering:

- `model(src, src_valid_len, tgt_in, tgt_valid_len) -> logits (B, T, V)` for training;
- `encode(src, src_valid_len) -> list` of batch-first encoder states;
- `init_decode_states(enc_states) -> list` of batch-first decoder states;
- `decode_step(tokens (B,), states) -> (log_probs (B, V), new_states, attn (B, S) or None)`;
- optionally `static_decode_states`: indices of states shared by all beams of a sentence (beam search then
  skips reordering them).

`models/` imports only mxnet, gluonnlp and `models/*`.
"""
from __future__ import annotations

from mxnet.gluon import HybridBlock

from dist_nmt.models.gnmt import GNMTModel
from dist_nmt.models.hparams import GNMTHParams, TransformerHParams
from dist_nmt.models.transformer import TransformerModel

MODELS: dict[str, type[HybridBlock]] = {
    "transformer": TransformerModel,
    "gnmt": GNMTModel,
}


def build_model(arch: str, hparams, vocab_size: int) -> HybridBlock:
    """Construct model `arch` with its hyper-parameters (TransformerHParams, GNMTHParams, ...)."""
    if arch not in MODELS:
        raise ValueError(f"unknown model '{arch}'; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[arch](hparams, vocab_size)


__all__ = ["MODELS", "GNMTHParams", "TransformerHParams", "TransformerModel", "build_model"]
