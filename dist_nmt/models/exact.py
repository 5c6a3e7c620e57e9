"""FullyConnected that mixed precision leaves in float32, for the GEMMs that compute statistics.

`amp.init` (called by `dist_nmt.precision.init_amp`) rebinds `F.FullyConnected` so that every call casts its inputs
to float16 / bfloat16. That is what the learned projections should do, but some of our GEMMs are reductions and
broadcasts in disguise: LayerNorm's row means, variances and gamma/beta outer products (`transformer.LayerNorm`) and
the loss's mean over the vocabulary (`dist_nmt.loss`). In 16 bits their inputs lose all but 8 (bf16) or 11 (fp16)
mantissa bits, and in fp16 a squared deviation above 256 overflows.

`fully_connected` calls the same operator through a binding made here from MXNet's operator registry, which
`amp.init` never patches: in fp32 training it is the very op it replaces (same graph, same oneDNN kernel); under AMP
it computes in the dtype of its inputs, which are float32 at every caller.
"""
from __future__ import annotations

import ctypes

import mxnet as mx
from mxnet.base import _LIB, OpHandle, c_str, check_call
from mxnet.ndarray.register import _make_ndarray_function
from mxnet.symbol.register import _make_symbol_function


def _unpatched(make_function, op_name: str):
    """A fresh Python binding of registered operator `op_name` (what MXNet builds for mx.nd / mx.sym at import)."""
    handle = OpHandle()
    check_call(_LIB.NNGetOpHandle(c_str(op_name), ctypes.byref(handle)))
    return make_function(handle, op_name, op_name)


_FULLY_CONNECTED = {mx.nd: _unpatched(_make_ndarray_function, "FullyConnected"),
                    mx.sym: _unpatched(_make_symbol_function, "FullyConnected")}


def fully_connected(F, data, weight, num_hidden: int):
    """data (..., K) x weight (num_hidden, K)ᵀ -> (..., num_hidden), no bias, in the dtype of the inputs.

    `F` is mx.nd or mx.sym (a HybridBlock's F). Under AMP this op is not cast to 16 bits; keep its inputs float32.
    """
    return _FULLY_CONNECTED[F](data, weight, no_bias=True, num_hidden=num_hidden, flatten=False)
