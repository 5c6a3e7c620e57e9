"""Loss-scaler state machine and precision checks."""
import os
import subprocess
import sys

import pytest

from dist_nmt import ops
from dist_nmt.precision import LossScaler, PrecisionError, check_precision, cpu_flags, enable_amx, resolve_dtype

ZEN4 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


def test_grows_after_interval_of_clean_updates():
    s = LossScaler(scale=8.0, growth_interval=3)
    assert [s.update(True) for _ in range(3)] == [False, False, False]
    assert s.scale == 16.0 and s.clean_updates == 0


def test_overflow_skips_and_backs_off_and_resets_growth():
    s = LossScaler(scale=8.0, growth_interval=3)
    s.update(True)
    s.update(True)
    assert s.update(False) is True
    assert s.scale == 4.0 and s.clean_updates == 0 and s.num_overflows == 1
    s.update(True)
    s.update(True)
    assert s.scale == 4.0  # interval restarted after the overflow


def test_minimum_scale_aborts_with_clear_message():
    s = LossScaler(scale=2.0, min_scale=1.0)
    s.update(False)  # 1.0: still allowed
    with pytest.raises(PrecisionError, match="minimum loss scale 1.0 reached"):
        s.update(False)


def test_state_round_trip():
    s = LossScaler(scale=64.0, growth_interval=5)
    s.update(False)
    s.update(True)
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == {"scale": 32.0, "clean_updates": 1, "num_overflows": 1}


def test_disabled_scaler_keeps_scale_one_but_still_skips():
    s = LossScaler(enabled=False)
    assert s.scale == 1.0
    assert s.update(False) is True and s.scale == 1.0


def test_fp16_on_cpu_refused_naming_alternative():
    with pytest.raises(PrecisionError, match="precision.dtype=bf16 or fp32"):
        check_precision("fp16", on_gpu=False)
    check_precision("fp16", on_gpu=True)
    check_precision("fp32", on_gpu=False)


def test_bf16_on_gpu_refused_and_fp16_without_scaling_warns(caplog):
    with pytest.raises(PrecisionError, match="bf16 is CPU-only.*precision.dtype=fp16"):
        check_precision("bf16", on_gpu=True)
    check_precision("bf16", on_gpu=False, flags=ZEN4)
    check_precision("fp16", on_gpu=True, loss_scaling="none")
    assert "precision.loss_scaling=dynamic" in caplog.text


def test_token_sum_loss_starts_at_2_pow_7_and_overflow_skips_are_backoff_not_bad_updates():
    from dist_nmt.config import PrecisionConfig

    assert PrecisionConfig().init_scale == LossScaler().scale == 2.0**7
    s = LossScaler(scale=8.0, min_scale=1.0)
    backing_off = []
    for _ in range(4):  # 8 -> 4 -> 2 -> 1 -> 0.5 (below min_scale: fatal, with its own message)
        try:
            s.update(False)
        except PrecisionError:
            break
        backing_off.append(s.backing_off)
    assert backing_off == [True, True, True]
    assert LossScaler(enabled=False).backing_off is False  # without a scaler every skip is a bad update


def test_bf16_refused_on_a_cpu_without_avx512_and_warned_without_native_bf16(caplog, tmp_path):
    with pytest.raises(PrecisionError, match="lacks avx512bw, avx512dq, avx512f, avx512vl.*precision.dtype=fp32"):
        check_precision("bf16", on_gpu=False, flags={"avx2", "fma"})  # a Zen 2: oneDNN 2.4 has no bf16 kernels
    check_precision("fp32", on_gpu=False, flags={"avx2"})
    check_precision("bf16", on_gpu=False, flags=ZEN4 - {"avx512_bf16"})
    assert "without avx512_bf16" in caplog.text
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f"}
    assert cpu_flags(tmp_path / "missing") is None


# AMP wraps mx.sym functions once per process, so each order runs in a fresh interpreter. The graph is built
# symbolically (nothing runs in bf16), so this holds on any CPU.
_FC_INPUTS = """
import json, sys
import mxnet as mx
from dist_nmt import ops
from dist_nmt.config import load_config
from dist_nmt.precision import init_amp
from dist_nmt.train import build_model_for
cfg = load_config("configs/models/tiny.yaml", ["precision.dtype=bf16", "model.fused_ops=on", "train.max_updates=1"])
if sys.argv[1] == "amp_first":
    init_amp("bf16")
    try:
        ops.load()
    except RuntimeError as err:
        print("refused:", err)
    sys.exit()
model = build_model_for(cfg, 50, mx.cpu())
out = model(*(mx.sym.var(n) for n in ("src", "src_len", "tgt_in", "tgt_len")))
nodes = json.loads(out.tojson(remove_amp_cast=False))["nodes"]
for fc in (n for n in nodes if n["op"] == "FullyConnected"):
    data, weight = (nodes[i[0]] for i in fc["inputs"][:2])
    source = nodes[weight["inputs"][0][0]] if weight["op"] == "amp_cast" else weight  # the weight before its cast
    if source["op"] == "Reshape":
        source = nodes[source["inputs"][0][0]]
    stats = "ones" in data["op"] or source["op"] == "_ones" or source["name"].endswith(("_gamma", "_beta"))
    # LayerNorm's own GEMMs (statistics, gamma/beta products) or a learned layer
    print("norm" if stats else "learned", data["op"], data.get("attrs", {}).get("dtype"), weight["op"],
          weight.get("attrs", {}).get("dtype"))
"""


def test_bf16_with_fused_ops_casts_every_fully_connected_to_bf16():
    try:
        ops.build()
    except RuntimeError as err:
        pytest.skip(f"fused ops library cannot be built: {err}")
    run = [sys.executable, "-c", _FC_INPUTS]
    lines = subprocess.run([*run, "build"], capture_output=True, text=True, check=True).stdout.splitlines()
    # Loading the library after amp.init used to regenerate mx.sym and drop every cast: bf16 silently ran fp32.
    learned = {line for line in lines if line.startswith("learned")}
    assert len(learned) == 1 and len(lines) > 20, lines
    assert learned == {"learned amp_cast bfloat16 amp_cast bfloat16"}, lines
    assert all("bfloat16" not in line for line in lines if line.startswith("norm")), lines  # statistics stay fp32
    refused = subprocess.run([*run, "amp_first"], capture_output=True, text=True, check=True).stdout
    assert "refused:" in refused and "before dist_nmt.precision.init_amp" in refused


def test_auto_precision_is_bf16_only_where_onednn_got_amx():
    assert resolve_dtype("auto", on_gpu=False, amx_status="on") == "bf16"
    assert resolve_dtype("auto", on_gpu=False, amx_status="off: this CPU has no AMX") == "fp32"
    assert resolve_dtype("auto", on_gpu=False, amx_status="user: DNNL_MAX_CPU_ISA=AVX512_CORE") == "fp32"
    assert resolve_dtype("auto", on_gpu=True, amx_status="on") == "fp32"
    assert resolve_dtype("fp16", on_gpu=True, amx_status="off: this CPU has no AMX") == "fp16"


def test_amx_is_left_alone_on_a_cpu_without_it_and_a_user_isa_choice_is_kept():
    environ: dict[str, str] = {}
    assert enable_amx(flags=ZEN4, environ=environ) == "off: this CPU has no AMX" and environ == {}
    if not {"amx_tile", "amx_bf16"} <= (cpu_flags() or set()):
        return  # asking the kernel for AMX needs a CPU that has it
    environ = {"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    assert enable_amx(environ=environ) == "user: DNNL_MAX_CPU_ISA=AVX512_CORE_BF16"
    assert environ == {"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}


_BF16_FC = """
from dist_nmt import environment
environment.init(None)
import mxnet as mx
from mxnet.contrib import amp
x = mx.nd.amp_cast(mx.nd.ones((64, 64)), dtype=amp.amp.bfloat16)
y = mx.nd.FullyConnected(x, x, no_bias=True, num_hidden=64)
print(environment.AMX_STATUS, float(mx.nd.amp_cast(y, dtype="float32").sum().asscalar()))
"""


@pytest.mark.skipif(not {"amx_tile", "amx_bf16", "avx512f"} <= (cpu_flags() or set()), reason="no AMX on this CPU")
def test_bf16_matmul_runs_on_amx_kernels_after_environment_init():
    # Pointing oneDNN 2.4 at AMX without the kernel's permission dies with SIGILL on the first tile instruction.
    env = {k: v for k, v in os.environ.items() if k != "DNNL_MAX_CPU_ISA"} | {"DNNL_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", _BF16_FC], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Intel AMX with bfloat16" in proc.stdout, proc.stdout[:2000]
    assert proc.stdout.splitlines()[-1] == f"on {64.0 * 64 * 64}"  # every entry 64, exact in bf16
