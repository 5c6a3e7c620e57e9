"""Dynamic loss scaling on CPU (fp32 with scaling): one rank's overflow is everyone's skip, scaling changes
nothing numerically, and the scale survives a resume. fp16 itself needs a GPU and is refused here, but its graph
is checked: which ops AMP puts in 16 bits and which it keeps in fp32, for fp16 and bf16."""
import functools
import json

import mxnet as mx
import numpy as np
import pytest

from dist_nmt.errors import PrecisionError
from dist_nmt.precision import check_precision
from integration.test_horovod import LAUNCH, hvd_train  # noqa: F401  (launcher definitions)
from support import FAST, PYTHON, metrics, run_cli, train

SCALED = ["precision.loss_scaling=dynamic", "precision.init_scale=1024", "precision.growth_interval=3",
          "train.log_every_updates=1", "model.transformer.dropout=0", "model.transformer.attention_dropout=0"]


def _load(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def _last(run) -> dict[str, np.ndarray]:
    return _load(sorted((run / "checkpoints").glob("ckpt-*"))[-1] / "model.params")


def test_overflow_on_one_rank_skips_on_all_backs_off_and_grows_back(tmp_path, prepared):
    common = [prepared, *FAST, *SCALED, "train.max_updates=10", "train.data_shards=2"]
    one, every, dump = tmp_path / "one", tmp_path / "every", tmp_path / "dump"
    proc = hvd_train("gloo", [*common, f"train.run_dir={one}", "dist.consistency_check_every_updates=5"],
                     env={"DIST_NMT_INJECT_NAN": "4@1", "DIST_NMT_DUMP_PARAMS": str(dump)})
    assert "update 4 skipped" in proc.stdout + proc.stderr
    scales = [r["loss_scale"] for r in metrics(one, "train")]
    # growth every 3 clean updates: 1024 -> 2048 (after 3), overflow at 4 halves, then grows again after 7.
    assert scales[2] == 2048 and scales[3] == 1024 and scales[6] == 2048 and scales[9] == 4096, scales
    rank0, rank1 = _load(dump / "rank0.params"), _load(dump / "rank1.params")
    assert all(np.array_equal(rank0[k], rank1[k]) for k in rank0)
    # The same update overflowing on every rank gives the same parameters: a one-rank overflow is a global skip.
    hvd_train("gloo", [*common, f"train.run_dir={every}"], env={"DIST_NMT_INJECT_NAN": "4"})
    reference = _last(every)
    assert all(np.array_equal(rank0[k], reference[k]) for k in rank0)
    assert not all(np.array_equal(rank0[k], _last_unscaled(tmp_path, prepared)[k]) for k in rank0)


def _last_unscaled(tmp_path, prepared):
    run = tmp_path / "clean"
    if not run.exists():
        hvd_train("gloo", [prepared, *FAST, *SCALED, "train.max_updates=10", "train.data_shards=2",
                           f"train.run_dir={run}"])
    return _last(run)


def test_loss_scaled_fp32_equals_unscaled(tmp_path, prepared):
    common = [prepared, *FAST, "train.max_updates=8", "model.transformer.dropout=0"]
    train([*common, f"train.run_dir={tmp_path / 'plain'}"])
    train([*common, f"train.run_dir={tmp_path / 'scaled'}", "precision.loss_scaling=dynamic",
           "precision.init_scale=65536"])
    a, b = _last(tmp_path / "plain"), _last(tmp_path / "scaled")
    # Scaling by 2^16 is exact; the unscale rounds differently by ~1 ulp, which Adam amplifies for weights whose
    # gradient is ~0 (m / sqrt(v) of noise). 8 updates move weights by ~1e-3, so 1e-4 still catches a wrong unscale.
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4, err_msg=name)


def test_resume_restores_loss_scale(tmp_path, prepared):
    run = tmp_path / "run"
    common = [prepared, *FAST, *SCALED, "precision.growth_interval=100", f"train.run_dir={run}"]
    train([*common, "train.max_updates=5"], env={"DIST_NMT_INJECT_NAN": "2,3"})
    train([*common, "train.max_updates=7"])
    assert [r["loss_scale"] for r in metrics(run, "train")] == [1024, 512, 256, 256, 256, 256, 256]


def test_fp16_on_cpu_is_refused_at_start(tmp_path, prepared):
    proc = train([prepared, *FAST, f"train.run_dir={tmp_path}", "precision.dtype=fp16"], check=False)
    assert proc.returncode == 1 and "needs a GPU" in proc.stderr and "Traceback" not in proc.stderr


def _bf16_unsupported() -> str:
    try:
        check_precision("bf16", on_gpu=False)
    except PrecisionError as err:
        return str(err)
    return ""


@pytest.mark.skipif(bool(_bf16_unsupported()), reason=_bf16_unsupported()[:120])
def test_bf16_on_cpu_trains_close_to_fp32(tmp_path, prepared):
    common = [prepared, *FAST, "train.max_updates=40", "train.log_every_updates=10", "model.transformer.dropout=0"]
    train([*common, f"train.run_dir={tmp_path / 'fp32'}"])
    train([*common, f"train.run_dir={tmp_path / 'bf16'}", "precision.dtype=bf16"])
    fp32 = [r["loss"] for r in metrics(tmp_path / "fp32", "train")]
    bf16 = [r["loss"] for r in metrics(tmp_path / "bf16", "train")]
    assert bf16[-1] < bf16[0] - 0.5
    # With MXNet's oneDNN amp_cast dropping accumulated gradients (see the test below) bf16 lagged: 6.50 vs 6.10
    # after 40 updates. Fixed, it tracks fp32 to bf16 rounding.
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)


_GRADS = """
import sys
from dist_nmt import environment
environment.init(None)
import mxnet as mx, numpy as np
from dist_nmt.config import load_config
from dist_nmt.data import random_batch
from dist_nmt.step import forward_loss, to_nd
from dist_nmt.train import build_model_for
cfg = load_config(sys.argv[1], ["precision.dtype=" + sys.argv[2], "train.max_updates=1",
                                "model.transformer.dropout=0", "model.gnmt.dropout=0"])
model = build_model_for(cfg, 60, mx.cpu())
model.collect_params().setattr("grad_req", sys.argv[3])
x = to_nd(random_batch(4, 7, 6, 60), mx.cpu())
with mx.autograd.record():
    loss, _ = forward_loss(model, x, 0.1, False)
loss.backward()
np.savez(sys.argv[4], **{n: p.grad().asnumpy() for n, p in model.collect_params().items()})
"""


@pytest.mark.skipif(bool(_bf16_unsupported()), reason=_bf16_unsupported()[:120])
@pytest.mark.parametrize("model", ["configs/tiny.yaml", "configs/models/gnmt_2x512.yaml"])
def test_bf16_gradients_reach_every_parameter_when_they_accumulate(tmp_path, model):
    # MXNet 1.9.1's oneDNN amp_cast never adds its backward into an accumulating (grad_req='add') gradient: every
    # parameter AMP casts got a zero gradient and bf16 training barely moved (dist_nmt.precision works around it).
    grads = {}
    for dtype, req in [("bf16", "add"), ("bf16", "write"), ("fp32", "write")]:
        out = tmp_path / f"{dtype}_{req}.npz"
        run_cli([PYTHON, "-c", _GRADS, model, dtype, req, str(out)], timeout=300)
        grads[dtype, req] = dict(np.load(out))
    accumulated, written, fp32 = grads["bf16", "add"], grads["bf16", "write"], grads["fp32", "write"]
    zero = [name for name, g in accumulated.items() if not np.any(g)]
    assert not zero, f"{len(zero)} of {len(accumulated)} parameters got no gradient in bf16: {zero[:5]}"
    for name in accumulated:
        np.testing.assert_array_equal(accumulated[name], written[name], err_msg=name)
    cosine = {n: float((accumulated[n] * fp32[n]).sum() / (np.linalg.norm(accumulated[n]) * np.linalg.norm(fp32[n])))
              for n in fp32 if np.any(fp32[n])}
    assert min(cosine.values()) > 0.9, sorted(cosine.items(), key=lambda kv: kv[1])[:3]


@pytest.mark.skipif(not _bf16_unsupported(), reason="this CPU runs bf16")
def test_bf16_refused_at_start_on_a_cpu_without_avx512(tmp_path, prepared):
    proc = train([prepared, *FAST, f"train.run_dir={tmp_path}", "precision.dtype=bf16"], check=False)
    assert proc.returncode == 1 and "needs an AVX-512 CPU" in proc.stderr and "Traceback" not in proc.stderr


# The precision layout AMP gives the models (tests/integration/amp_layout.py, one process per dtype: amp.init is
# global). fp16 cannot run on CPU, but its graph can be built, so a GPU user gets the layout checked here.
@functools.cache
def _layout(dtype: str) -> dict:
    return json.loads(run_cli([PYTHON, "tests/integration/amp_layout.py", dtype], timeout=300).stdout)


def _is_norm_gemm(node: dict) -> bool:
    """A GEMM of our LayerNorm (statistics, gamma/beta outer products): its weight is made of ones, gamma or beta."""
    return node["weight"] == "_ones" or node["weight"].endswith(("_gamma", "_beta"))


def _assert_layout(nodes: list[dict], low: str, batch_dot: str, rnn: str) -> set[str]:
    """Learned matmuls in `low`; LayerNorm (every form), softmaxes and linalg in float32. Returns the ops seen."""
    want = {"batch_dot": batch_dot, "RNN": rnn, "softmax": "float32", "log_softmax": "float32",
            "LayerNorm": "float32", "_linalg_gemm2": "float32", "dn_add_dropout_norm": "float32",
            "dn_norm": "float32", "dn_add_dropout": "float32", "dn_attention": "float32"}
    seen = set()
    for node in nodes:
        op = node["op"]
        if op == "FullyConnected":
            op = "FullyConnected/norm" if _is_norm_gemm(node) else "FullyConnected/learned"
            expected = "float32" if op == "FullyConnected/norm" else low
        elif op in want:
            expected = want[op]
        else:
            continue
        seen.add(op)
        floats = [t for t in node["inputs"] if t != "int32"]  # softmax's lengths
        assert floats and all(t == expected for t in floats), (node["name"], node["inputs"], expected)
    return seen


def _assert_loss_fp32(loss: dict) -> None:
    assert loss["error"] == "", loss["error"]
    assert [[2, 3, 50], "float32"] in loss["casts"], loss["casts"]  # 16-bit logits widened for log_softmax
    assert all(to == "float32" for _, to in loss["casts"]), loss["casts"]  # nothing narrowed to 16 bits
    np.testing.assert_allclose(loss["loss"], loss["reference"], rtol=1e-6)  # a 16-bit vocabulary mean is ~1e-3 off


def test_fp16_layout_half_matmuls_fp32_norms_softmax_loss_and_master_weights():
    layout = _layout("fp16")
    graphs = layout["variants"]
    gpu_transformer = graphs["transformer"]  # as on a GPU: MXNet's LayerNorm op
    for part in ("train", "step"):
        seen = _assert_layout(gpu_transformer[part], "float16", batch_dot="float16", rnn="float16")
        assert {"FullyConnected/learned", "batch_dot", "softmax", "LayerNorm"} <= seen, seen
    assert "log_softmax" in _assert_layout(gpu_transformer["step"], "float16", "float16", "float16")
    # The GEMM-form LayerNorm (CPU without the fused ops) would also keep its statistics in fp32.
    assert "FullyConnected/norm" in _assert_layout(graphs["transformer/gemm_norm"]["train"], "float16", "float16",
                                                   "float16")
    gnmt = _assert_layout(graphs["gnmt"]["train"], "float16", batch_dot="float16", rnn="float16")
    assert {"FullyConnected/learned", "RNN", "softmax", "_linalg_gemm2"} <= gnmt, gnmt
    assert "log_softmax" in _assert_layout(graphs["gnmt"]["step"], "float16", "float16", "float16")
    _assert_loss_fp32(layout["loss"])
    assert layout["optimizer"] == {"multi_precision": True, "param_dtypes": ["float32"]}


def test_bf16_layout_bf16_fully_connected_fp32_norms_softmax_and_loss():
    layout = _layout("bf16")
    graphs = layout["variants"]
    # MXNet 1.9.1 has bf16 CPU kernels for FullyConnected (and Convolution) only: batch_dot and RNN stay fp32.
    norm = _assert_layout(graphs["transformer/gemm_norm"]["train"], "bfloat16", batch_dot="float32", rnn="float32")
    assert {"FullyConnected/learned", "FullyConnected/norm", "batch_dot", "softmax"} <= norm, norm
    if "transformer/fused" in graphs:  # the CPU default when the fused library builds here
        fused = _assert_layout(graphs["transformer/fused"]["train"], "bfloat16", "float32", "float32")
        assert {"FullyConnected/learned", "FullyConnected/norm", "dn_add_dropout_norm", "dn_attention"} <= fused
    for name in graphs:
        assert "log_softmax" in _assert_layout(graphs[name]["step"], "bfloat16", "float32", "float32")
    gnmt = _assert_layout(graphs["gnmt"]["train"], "bfloat16", batch_dot="float32", rnn="float32")
    assert {"FullyConnected/learned", "RNN", "softmax"} <= gnmt, gnmt
    _assert_loss_fp32(layout["loss"])
    assert layout["optimizer"]["param_dtypes"] == ["float32"]  # the weights the optimizer updates are the masters
