"""Model hyper-parameters as frozen dataclasses.

Pure Python (no mxnet import) so that `dist_nmt.config` can use them as config sections and presets in
`configs/models/*.yaml` map onto them one to one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerHParams:
    """Transformer sizes (Vaswani et al., 2017). Defaults are transformer_base."""

    num_enc_layers: int = 6
    num_dec_layers: int = 6
    d_model: int = 512
    d_ff: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    pre_norm: bool = False
    tie_embeddings: bool = True


@dataclass(frozen=True)
class GNMTHParams:
    """GNMT sizes (Wu et al., 2016). Defaults are gnmt_2x512 (the IWSLT'15-sized model)."""

    num_enc_layers: int = 2
    num_dec_layers: int = 2
    hidden_size: int = 512
    embed_size: int = 512
    num_bi_layers: int = 1
    residual_from_layer: int = 3
    attention: str = "normed_mlp"  # mlp | normed_mlp (additive) | luong | scaled_luong (multiplicative)
    dropout: float = 0.2
    tie_embeddings: bool = True
    decoder_init: str = "zeros"  # zeros | encoder (final h, c per layer) | encoder_h (final h, c = 0)
    attention_chunk_units: int = 0  # additive attention: score over slices of this many units (0 = all at once)
