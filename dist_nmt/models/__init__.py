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

`models/` imports only mxnet, gluonnlp and `models/*`. Importing this package does not import MXNet: the
hyper-parameter dataclasses (`models.hparams`) are plain Python so `dist_nmt.config` can use them, and the models
themselves load on first use of `build_model` / `MODELS` (after the process has set its OpenMP threads).
"""
from __future__ import annotations

from typing import Any

from dist_nmt.models.hparams import GNMTHParams, TransformerHParams

MODEL_NAMES = ("gnmt", "transformer")
# How the Transformer's training forward computes attention (dist_nmt.models.attention says what each one is).
ATTENTION_IMPLS = ("batch_dot", "fused", "interleaved")


def _models() -> dict[str, Any]:
    from dist_nmt.models.gnmt import GNMTModel  # imports MXNet: only once a model is wanted
    from dist_nmt.models.transformer import TransformerModel

    return {"transformer": TransformerModel, "gnmt": GNMTModel}


def __getattr__(name: str) -> Any:
    if name == "MODELS":  # name -> HybridBlock class; importing it loads MXNet
        return _models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(arch: str, hparams: Any, vocab_size: int, fused_ops: bool = False,
                attention_impl: str | None = None) -> Any:
    """Construct model `arch` (a HybridBlock) with its hyper-parameters (TransformerHParams, GNMTHParams, ...).

    `fused_ops=True` (only after `dist_nmt.ops.load()` succeeded) selects the fused CPU ops where the model has
    them. `attention_impl` (one of ATTENTION_IMPLS, `fused` only with `fused_ops`) picks
    the Transformer's attention; None means `fused` with `fused_ops`, else `batch_dot`.
    """
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown model '{arch}'; choose one of: {', '.join(MODEL_NAMES)}")
    if arch == "transformer":
        return _models()[arch](hparams, vocab_size, fused_ops=fused_ops, attention_impl=attention_impl)
    return _models()[arch](hparams, vocab_size, fused_ops=fused_ops)


__all__ = ["ATTENTION_IMPLS", "MODELS", "MODEL_NAMES", "GNMTHParams", "TransformerHParams", "build_model"]
