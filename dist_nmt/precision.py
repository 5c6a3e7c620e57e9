"""Numeric precision checks and the dynamic loss scaler.

The scaler is a small state machine over floats: multiply the loss by `scale`; when the (all-reduced) gradients
overflow, skip the update and back off; after `growth_interval` clean updates in a row, grow. Because it only ever
sees reduced gradients, every rank takes the same decision on the same step.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from dist_nmt.errors import PrecisionError

log = logging.getLogger(__name__)


# oneDNN 2.4 (inside the mxnet 1.9.1 wheel) implements bf16 only on avx512_core (its `has_data_type_support`);
# below it a bf16 FullyConnected fails mid-step with "could not create a primitive descriptor iterator".
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo), or None when they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


# Linux (>= 5.16) hands out AMX tile state only to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM for
# XTILEDATA); oneDNN 2.4 predates that, and keeps its AMX kernels behind DNNL_MAX_CPU_ISA=AVX512_CORE_AMX. Without
# both, a bf16 FullyConnected runs the avx512_bf16 kernels at ~0.6x of fp32; with both, 2.5-4x of fp32 (README).
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
_AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})


def enable_amx(flags: Collection[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """Give oneDNN the AMX tile kernels (bf16 GEMMs) on a CPU that has them; call before MXNet is imported.

    Asks the kernel for this process's AMX permission and, only when granted, sets DNNL_MAX_CPU_ISA (a value the
    user set is kept). Returns what happened, for the log: "on", "off: <reason>" or "user: <value>".
    """
    environ = os.environ if environ is None else environ
    flags = cpu_flags() if flags is None else frozenset(flags)
    if platform.machine() != "x86_64" or flags is None or not _AMX_FLAGS <= flags:
        return "off: this CPU has no AMX"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        return f"off: the kernel refused AMX permission ({os.strerror(ctypes.get_errno())})"
    isa = environ.setdefault("DNNL_MAX_CPU_ISA", "AVX512_CORE_AMX")  # inherited from a parent that ran this: "on"
    return "on" if isa.upper() == "AVX512_CORE_AMX" else f"user: DNNL_MAX_CPU_ISA={isa}"


def resolve_dtype(dtype: str, on_gpu: bool, amx_status: str) -> str:
    """`precision.dtype` -> the precision that runs: `auto` is bf16 on a CPU whose AMX kernels are on
    (`enable_amx` returned "on": there bf16 trains the Multi30k model 1.4x faster, README), fp32 anywhere else (on
    GPU, fp16 is a choice to make explicitly with loss scaling). Other values pass through."""
    if dtype != "auto":
        return dtype
    return "bf16" if not on_gpu and amx_status == "on" else "fp32"


def check_precision(dtype: str, on_gpu: bool, loss_scaling: str = "dynamic",
                    flags: Collection[str] | None = None) -> None:
    """Refuse precisions this machine cannot train in, naming the alternative; warn about fp16 without scaling.

    `flags`: the CPU feature flags (default: read from /proc/cpuinfo; unknown flags are not refused).
    """
    if dtype == "bf16" and on_gpu:
        raise PrecisionError(
            "precision.dtype=bf16 is CPU-only in MXNet 1.9.1 (AMP's bfloat16 path is oneDNN; there are no bf16 CUDA "
            "kernels for its op lists). On GPU use precision.dtype=fp16 with precision.loss_scaling=dynamic, or fp32.")
    if dtype == "bf16":
        _check_cpu_bf16(cpu_flags() if flags is None else frozenset(flags))
    if dtype == "fp16" and loss_scaling == "none":
        log.warning("precision.dtype=fp16 with precision.loss_scaling=none: small gradients underflow to zero in "
                    "float16; set precision.loss_scaling=dynamic")
    if dtype == "fp16" and not on_gpu:
        raise PrecisionError(
            "precision.dtype=fp16 needs a GPU: MXNet 1.9.1 has no float16 matrix multiply on CPU "
            "('float16 fully connected layer is currently only supported by CuDNN'). On CPU use precision.dtype=bf16 "
            "or fp32 (optionally with precision.loss_scaling=dynamic to exercise the loss-scaling path).")


def _check_cpu_bf16(flags: frozenset[str] | None) -> None:
    if flags is None:
        return
    missing = sorted(_AVX512_CORE - flags)
    if missing:
        raise PrecisionError(
            f"precision.dtype=bf16 needs an AVX-512 CPU: this one lacks {', '.join(missing)}, and oneDNN 2.4 (in "
            "mxnet 1.9.1) has no bfloat16 kernels below avx512_core, so the first bf16 FullyConnected would fail "
            "('could not create a primitive descriptor iterator'). Use precision.dtype=fp32 here.")
    if "avx512_bf16" not in flags:
        log.warning("precision.dtype=bf16 on a CPU without avx512_bf16: oneDNN emulates the bf16 dot products, "
                    "which is usually slower than fp32; consider precision.dtype=fp32")


# Ops with no inputs that MXNet 1.9.1's bf16 list forces to fp32; wrapping them crashes symbol construction
# (`amp.py: 'NoneType' object is not iterable` at `_arange` when hybridizing). They make no floats to cast anyway.
_NO_INPUT_OPS = {"_arange", "_ones", "_zeros", "_full", "_eye", "_linspace", "_zeros_without_dtype"}


def init_amp(dtype: str) -> None:
    """Patch MXNet for mixed precision; call before the network is built and after `dist_nmt.ops.load()` (loading a
    library regenerates mx.sym/mx.nd and would silently drop AMP's casts; `ops.load` refuses to run after this).
    fp32 does nothing.

    fp16 (GPU): FullyConnected, RNN and batch_dot run in float16; softmax, log_softmax, LayerNorm and reductions in
    float32. bf16 (CPU with AVX-512; refused at start elsewhere): FullyConnected runs in bfloat16 with oneDNN
    (`gemm:jit` on plain `ab` weights: MXNet 1.9.1 keeps FC weights plain below 1024x1024 and 16384 rows); MXNet
    1.9.1 has no bf16 batch_dot, RNN or linalg kernels on CPU, so those stay fp32. Either way parameters, gradients
    and optimizer state stay fp32 (casts happen inside the graph), and the GEMMs that compute statistics
    (`dist_nmt.models.exact`) are not cast. tests/integration/amp_layout.py prints the resulting layout of every op.
    """
    if dtype == "fp32":
        return
    from mxnet.contrib import amp

    if dtype == "fp16":
        from mxnet.contrib.amp.lists import symbol_fp16

        # batch_dot is only "widest type" in MXNet's list: attention's probs x V would run in fp32, because the
        # softmax output is fp32. Listed here, both attention products are float16 (tensor cores).
        amp.init(target_dtype="float16", target_precision_ops=[*symbol_fp16.FP16_FUNCS, "batch_dot"])
        return
    from mxnet.contrib.amp.lists import symbol_bf16

    fp32_ops = [op for op in symbol_bf16.FP32_FUNCS
                if op not in _NO_INPUT_OPS and not op.startswith(("_random_", "random_"))]
    import mxnet as mx

    copies = {mx.symbol: mx.symbol.identity, mx.ndarray: mx.ndarray.identity}  # before AMP wraps them
    amp.init(target_dtype="bfloat16", fp32_ops=fp32_ops)
    _route_leaf_casts_through_copy(copies)


def _route_leaf_casts_through_copy(copies: dict) -> None:
    """Work around MXNet 1.9.1's oneDNN `amp_cast`/`amp_multicast` (CPU): with `req=kAddTo` their backward reorders
    into a temporary and never adds it (`AMPCastExCPU` has no `CommitOutput`), so a Parameter with `grad_req='add'`
    (ours: micro-batches accumulate) that AMP casts directly gets a zero gradient — 96 of the 97 parameters of the
    Multi30k Transformer, which then barely learned in bf16. A cast of a graph variable (or of an NDArray with a
    gradient attached) therefore casts an `identity` of it: the cast's gradient is written into the identity's
    output and the identity adds it into the Parameter's gradient correctly. Costs one copy of each cast
    parameter per forward. `copies`: module -> its identity function as it was before `amp.init` wrapped it."""
    import mxnet as mx

    def is_leaf(x) -> bool:
        if isinstance(x, mx.sym.Symbol):
            return x.get_children() is None
        return isinstance(x, mx.nd.NDArray) and x.grad is not None

    for module, copy in copies.items():
        cast, multicast = module.amp_cast, module.amp_multicast
        if getattr(cast, "_dist_nmt_leaf_copy", False):
            continue

        def leaf_cast(data, *args, _cast=cast, _copy=copy, **kwargs):
            return _cast(_copy(data) if is_leaf(data) else data, *args, **kwargs)

        def leaf_multicast(*data, _multicast=multicast, _copy=copy, **kwargs):
            return _multicast(*(_copy(x) if is_leaf(x) else x for x in data), **kwargs)

        leaf_cast._dist_nmt_leaf_copy = True
        module.amp_cast, module.amp_multicast = leaf_cast, leaf_multicast


@dataclass
class LossScaler:
    """Dynamic loss scaling. `enabled=False` keeps scale at 1.0 and never changes it."""

    scale: float = 2.0**7
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    enabled: bool = True
    clean_updates: int = 0
    num_overflows: int = 0

    def __post_init__(self) -> None:
        if not self.enabled:
            self.scale = 1.0

    def update(self, finite: bool) -> bool:
        """Record one update's outcome; return True if that update must be skipped (gradients not finite)."""
        if finite:
            self.clean_updates += 1
            if self.enabled and self.clean_updates >= self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_updates = 0
            return False
        self.num_overflows += 1
        self.clean_updates = 0
        if self.enabled:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale / 2)
            if self.scale < self.min_scale:
                raise PrecisionError(
                    f"minimum loss scale {self.min_scale} reached after {self.num_overflows} overflows: the "
                    "gradients are not finite even at the smallest scale. Lower optim.lr, check the data, or use "
                    "precision.dtype=fp32; the last good checkpoint is intact.")
        return True

    @property
    def backing_off(self) -> bool:
        """An overflow skip is the scaler doing its job (it can still halve the scale), not a bad update."""
        return self.enabled and self.scale >= self.min_scale

    def state_dict(self) -> dict:
        """Plain-float state for checkpoints."""
        return {"scale": self.scale, "clean_updates": self.clean_updates, "num_overflows": self.num_overflows}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.scale = float(state["scale"])
        self.clean_updates = int(state["clean_updates"])
        self.num_overflows = int(state["num_overflows"])
