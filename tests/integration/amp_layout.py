"""Print, as one JSON object, the precision layout that AMP gives our models: `python amp_layout.py fp16|bf16`.

Run in a fresh process per dtype: amp.init patches MXNet globally and for good. The models are built the trainer's
way (`train.build_model_for`), then called with symbols, which is what hybridize records. Casts are read from
`tojson(remove_amp_cast=False)`: the default `tojson()` / `export()` strips every amp_cast, so an exported model
shows none. Each op's input dtypes come from type inference, which also resolves amp_multicast (widest type).

fp16 needs a GPU to run, but not to build: with `mx.context.num_gpus` reporting one GPU the Transformer picks the
LayerNorm it picks on a GPU. The loss is eager NDArray code, and AMP casts NDArrays only on their dtype's device
family (fp16: GPU), so for fp16 the casts are made to apply to CPU arrays as well, as they would on a GPU.
"""
import json
import sys
from collections.abc import Callable

import mxnet as mx
import numpy as np
from mxnet.contrib import amp

from dist_nmt import distributed, ops
from dist_nmt.config import load_config
from dist_nmt.loss import label_smoothed_nll
from dist_nmt.train import build_model_for, make_optimizer

VOCAB = 50
TRANSFORMER = ["model.transformer.d_model=32", "model.transformer.d_ff=64", "model.transformer.num_heads=2",
               "model.transformer.num_enc_layers=1", "model.transformer.num_dec_layers=1"]
GNMT = ["model.arch=gnmt", "model.gnmt.hidden_size=32", "model.gnmt.embed_size=32"]
INT_INPUTS = {"src", "tgt_in"}


def _dtype_name(t) -> str:
    t = np.dtype(t)
    return "bfloat16" if t.names else t.name  # MXNet's bfloat16 is a structured numpy dtype


def layout(sym: mx.sym.Symbol) -> list[dict]:
    """Every op node: {op, name, inputs: [dtype of each input after casts], output: dtype, weight: what input 1
    is made from (through casts, reshapes and scalings: LayerNorm's gamma/beta or _ones, else a weight)}."""
    internals = sym.get_internals()
    types = {a: ("int32" if a in INT_INPUTS else "float32") for a in sym.list_arguments()}
    _, out_types, _ = internals.infer_type(**types)
    by_output = dict(zip(internals.list_outputs(), map(_dtype_name, out_types), strict=True))
    nodes = json.loads(sym.tojson(remove_amp_cast=False))["nodes"]

    def dtype_of(j: int, k: int) -> str:
        name = nodes[j]["name"]
        keys = [name] if nodes[j]["op"] == "null" else [f"{name}_output{k}", f"{name}_output"]
        return next(by_output[key] for key in keys if key in by_output)

    def source(j: int) -> str:  # what a weight is made from: a parameter's name, or an op such as _ones
        while nodes[j]["op"] in ("amp_cast", "amp_multicast", "_copy", "Reshape", "_mul_scalar", "broadcast_mul"):
            j = nodes[j]["inputs"][0][0]
        return nodes[j]["name"] if nodes[j]["op"] == "null" else nodes[j]["op"]

    out = []
    for i, n in enumerate(nodes):
        if n["op"] in ("null", "amp_cast", "amp_multicast"):
            continue
        inputs = [dtype_of(j, k) for j, k, _ in n["inputs"]]
        weight = source(n["inputs"][1][0]) if len(n["inputs"]) > 1 else ""
        out.append({"op": n["op"], "name": n["name"], "inputs": inputs, "weight": weight,
                    "output": dtype_of(i, 0)})
    return out


def graphs(model, arch: str, num_dec_layers: int) -> dict:
    """The training forward and the incremental decode step, as symbols."""
    train = model(*[mx.sym.var(n) for n in ("src", "src_valid_len", "tgt_in", "tgt_valid_len")])
    if arch == "transformer":  # tokens, step, src_valid_len, mem k/v and self k/v per layer
        step_inputs = ["tokens", "step", "src_valid_len"] + [f"cache{i}" for i in range(4 * num_dec_layers)]
    else:  # tokens, memory, keys, src_valid_len, h/c per layer
        step_inputs = ["tokens", "memory", "keys", "src_valid_len"] + [f"state{i}" for i in range(2 * num_dec_layers)]
    step = model.step_block(*[mx.sym.var(n) for n in step_inputs])
    return {"train": layout(train), "step": layout(step[0])}  # step[0]: log-probabilities


def check_loss(dtype: str) -> dict:
    """label_smoothed_nll on 16-bit logits: the casts AMP made (shape, to dtype) and the loss vs a float64 one."""
    target = np.dtype("float16") if dtype == "fp16" else amp.amp.bfloat16
    casts = []
    original: Callable = amp.amp._cast_symbol_NDArray

    def recording_cast(x, to):
        if isinstance(x, mx.nd.NDArray):
            casts.append([list(x.shape), _dtype_name(to)])
            if dtype == "fp16" and x.dtype != to and x.dtype in (np.float16, np.float32):  # the GPU branch
                return mx.nd.amp_cast(x, dtype=to)
        return original(x, to)

    amp.amp._cast_symbol_NDArray = recording_cast
    rng = np.random.default_rng(0)
    logits = mx.nd.amp_cast(mx.nd.array(rng.normal(0, 3, (2, 3, VOCAB))), dtype=target)  # (B, T, V)
    tgt_out, tgt_valid_len, epsilon = rng.integers(0, VOCAB, (2, 3)), np.array([3.0, 2.0]), 0.5
    try:
        loss, _ = label_smoothed_nll(logits, mx.nd.array(tgt_out), mx.nd.array(tgt_valid_len), epsilon)
        value, error = float(loss.asnumpy()), ""
    except mx.MXNetError as err:
        value, error = float("nan"), str(err).splitlines()[0]
    finally:
        amp.amp._cast_symbol_NDArray = original
    x = mx.nd.amp_cast(logits, dtype="float32").asnumpy().astype(np.float64)
    log_probs = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, tgt_out[..., None], -1)[..., 0]
    per_token = (1 - epsilon) * nll - epsilon * log_probs.mean(-1)
    reference = float((per_token * (np.arange(3)[None] < tgt_valid_len[:, None])).sum())
    return {"casts": casts, "loss": value, "reference": reference, "error": error}


def main() -> None:
    dtype = sys.argv[1]
    variants = []  # (name, config overrides, report a GPU), fused first: its library must load before amp.init
    if dtype == "bf16" and ops.load():
        variants.append(("transformer/fused", [*TRANSFORMER, "model.fused_ops=on"], False))
    variants += [("transformer/gemm_norm", [*TRANSFORMER, "model.fused_ops=off"], False),
                 ("gnmt", [*GNMT, "model.fused_ops=off"], False)]
    if dtype == "fp16":
        variants.insert(0, ("transformer", [*TRANSFORMER, "model.fused_ops=off"], True))
    distributed.init_world()
    result, num_gpus = {"variants": {}}, mx.context.num_gpus
    for name, overrides, gpu in variants:
        cfg = load_config("configs/tiny.yaml", [f"precision.dtype={dtype}", *overrides])
        mx.context.num_gpus = (lambda: 1) if gpu else num_gpus
        model = build_model_for(cfg, VOCAB, mx.cpu())
        mx.context.num_gpus = num_gpus
        hp = getattr(cfg.model, cfg.model.arch)
        result["variants"][name] = graphs(model, cfg.model.arch, hp.num_dec_layers)
        if name.startswith("transformer") and "optimizer" not in result:
            trainer = make_optimizer(cfg, model)
            result["optimizer"] = {
                "multi_precision": bool(trainer._optimizer.multi_precision),
                "param_dtypes": sorted({_dtype_name(p.dtype) for p in model.collect_params().values()})}
    result["loss"] = check_loss(dtype)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
