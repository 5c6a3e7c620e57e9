"""dist_nmt's fused CPU operator library: build it, load it once per process, decide whether a model uses it.

    python -m dist_nmt.ops build      # compile dist_nmt/ops/fused_ops.cc (scripts/bootstrap.sh does this)
    python -m dist_nmt.ops status     # say whether the library loads, and why not

    from dist_nmt import ops
    fused = ops.resolve("auto")       # model.fused_ops: auto | on | off -> bool, loads the library if needed
    impl = ops.resolve_attention("auto", fused)  # model.attention_impl -> batch_dot | fused | interleaved
    model = build_model("transformer", hparams, vocab_size, fused_ops=fused, attention_impl=impl)

The library registers `dn_add_dropout_norm`, `dn_norm`, `dn_add_dropout`, `dn_attention`, `dn_additive_score` and
`dn_smoothed_nll` (fused_ops.cc states their contracts); `dist_nmt.models.fused` calls the first five as `F.dn_*`,
the training and dev loss (`dist_nmt.loss.fused_label_smoothed_nll`) the last. Every rank must call `resolve` (or
`load`) before its model is built, so that all ranks run the same graph, and before `dist_nmt.precision.init_amp`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from dist_nmt.errors import ConfigError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_ops.cc")
LIBRARY = Path(__file__).with_name("libdist_nmt_ops.so")
STAMP = LIBRARY.with_suffix(".so.sha256")
FUSED_OPS_MODES = ("auto", "on", "off")
ATTENTION_MODES = ("auto", "batch_dot", "fused", "interleaved")
_BUILD_HINT = "build it with `bash scripts/bootstrap.sh` or `python -m dist_nmt.ops build` (needs g++)"

_state: dict[str, object] = {}  # "attempted", "loaded": bool, "reason": str — one MXNet load per process


def _mxnet_dir() -> Path:
    import mxnet

    return Path(mxnet.__file__).parent


def compile_flags() -> list[str]:
    """g++ flags. x86-64-v3 (AVX2 + FMA: Haswell / Zen 1 and newer) rather than -march=native: a library built on
    one node of a shared file system must not SIGILL on an older node, and these kernels are memory-bound enough
    that AVX-512 buys little. `DIST_NMT_OPS_CFLAGS` replaces the arch flag (e.g. `-march=native`)."""
    arch = os.environ.get("DIST_NMT_OPS_CFLAGS")
    if arch is None:
        arch = "-march=x86-64-v3" if platform.machine() in ("x86_64", "AMD64") else ""
    # -fopenmp links the system libgomp.so.1, the same OpenMP runtime libmxnet.so already loaded.
    # -Bsymbolic: Horovod's MXNet extension exports its own copy of lib_api's mxnet::ext symbols; without it this
    # library's op registry binds to Horovod's and dlopen dies with SIGFPE when Horovod was imported first.
    # -fno-trapping-math: lets GCC turn float compares into selects (the tanh clamp of dn_additive_score), without
    # which those loops stay scalar; results are unchanged, only FP exception flags may differ.
    return ["-O3", *arch.split(), "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
            "-Wl,-Bsymbolic"]


def source_hash() -> str:
    """Hash of what the library is built from: source, flags, and the lib_api it compiles against."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(compile_flags()).encode())
    digest.update((_mxnet_dir() / "include" / "mxnet" / "lib_api.h").read_bytes())
    return digest.hexdigest()


def is_current() -> bool:
    """True when the built library exists and matches the current source and flags."""
    return LIBRARY.exists() and STAMP.exists() and STAMP.read_text().strip() == source_hash()


def build(force: bool = False) -> Path:
    """Compile fused_ops.cc against the installed wheel's lib_api into dist_nmt/ops/ (skipped when current).

    Raises RuntimeError naming the fix when no compiler is found or compilation fails.
    """
    if not force and is_current():
        return LIBRARY
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler '{compiler}' on PATH: install g++ (apt-get install g++) or set CXX")
    mx_dir = _mxnet_dir()
    tmp = LIBRARY.with_suffix(f".so.tmp{os.getpid()}")
    cmd = [compiler, *compile_flags(), str(SOURCE), str(mx_dir / "src" / "lib_api.cc"),
           f"-I{mx_dir / 'include'}", "-o", str(tmp)]
    log.info("building fused ops: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    os.replace(tmp, LIBRARY)  # atomic: a concurrently starting rank never sees half a library
    STAMP.write_text(source_hash() + "\n")
    return LIBRARY


def load() -> bool:
    """Load the library into MXNet once per process; False (with the reason logged) when it is missing or stale.

    A missing or stale library is looked for again on the next call (a build may have happened in between); a load
    that MXNet attempted, successful or not, is final for the process.
    """
    if _state.get("attempted"):
        return bool(_state["loaded"])
    if _amp_initialized():  # a programming error, not a user's: keep the traceback
        raise RuntimeError("dist_nmt.ops.load() after amp.init: mx.library.load would rebind every MXNet operator and "
                           "silently undo AMP's casts (bf16 would train in fp32); load the fused ops before "
                           "dist_nmt.precision.init_amp, as train.build_model_for does")
    if not LIBRARY.exists():
        reason = f"{LIBRARY} not found: {_BUILD_HINT}"
    elif not is_current():
        reason = f"{LIBRARY} is stale (fused_ops.cc or flags changed): {_BUILD_HINT}"
    else:
        import mxnet as mx

        _state["attempted"] = True
        try:
            mx.library.load(str(LIBRARY.resolve()), verbose=False)
            reason = ""
        except Exception as err:  # MXNetError from a bad build, wrong MXNet, missing symbols
            reason = f"mx.library.load({LIBRARY}) failed: {err}; rebuild: python -m dist_nmt.ops build"
    _state.update(loaded=not reason, reason=reason)
    if reason:
        log.warning("fused CPU ops unavailable, using the pure-MXNet path: %s", reason)
    else:
        log.info("fused CPU ops loaded from %s", LIBRARY)
    return not reason


def _amp_initialized() -> bool:
    """Whether amp.init has patched MXNet in this process (never imports MXNet when nothing else has)."""
    amp = sys.modules.get("mxnet.contrib.amp.amp")
    return bool(getattr(amp, "_amp_initialized", False))


def unavailable_reason() -> str:
    """Why `load()` returned False ('' when loaded or not yet tried)."""
    return str(_state.get("reason", ""))


def _log_once(message: str) -> None:
    """INFO `message` the first time only: `resolve` is asked again by every user of the answer."""
    logged = _state.setdefault("logged", set())
    if message not in logged:
        logged.add(message)
        log.info(message)


def resolve(mode: str, on_gpu: bool = False) -> bool:
    """`model.fused_ops` -> whether the model uses the fused ops; loads the library unless `off`.

    auto: use them when the library loads (CPU only); on: raise naming the fix when it does not; off: never.
    """
    if mode not in FUSED_OPS_MODES:
        raise ValueError(f"model.fused_ops={mode!r}; choose one of: {', '.join(FUSED_OPS_MODES)}")
    if mode == "off":
        _log_once("fused CPU ops off (model.fused_ops=off): pure-MXNet path (model and log_softmax loss)")
        return False
    if on_gpu:
        if mode == "on":
            raise ConfigError("model.fused_ops=on: the fused ops are CPU-only; use model.fused_ops=auto on GPU")
        _log_once("fused CPU ops skipped on GPU: pure-MXNet path (model and log_softmax loss)")
        return False
    if load():
        _log_once(f"model uses the fused CPU ops (model.fused_ops={mode}), the loss too (dn_smoothed_nll)")
        return True
    if mode == "on":
        raise ConfigError(f"model.fused_ops=on but the fused ops did not load: {unavailable_reason()}; "
                           "or set model.fused_ops=auto to fall back to the pure-MXNet path")
    return False


def resolve_attention(mode: str, fused: bool, on_gpu: bool = False, dtype: str = "fp32") -> str:
    """`model.attention_impl` -> the Transformer's attention: batch_dot | fused | interleaved.

    auto: the fused C++ core on CPU when the library loaded (`fused`, from `resolve`), else batch_dot; MXNet's
    interleaved matmul ops on GPU (the cuBLAS strided-batched path). Impossible choices raise naming the fix.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"model.attention_impl={mode!r}; choose one of: {', '.join(ATTENTION_MODES)}")
    impl = mode
    if mode == "auto":
        impl = "interleaved" if on_gpu else "fused" if fused else "batch_dot"
    elif mode == "fused" and not fused:
        fix = "use model.attention_impl=auto or interleaved on GPU" if on_gpu else \
            f"set model.fused_ops=auto or on, or choose batch_dot ({unavailable_reason() or 'fused ops off'})"
        raise ConfigError(f"model.attention_impl=fused needs the fused CPU ops library: {fix}")
    elif mode == "interleaved" and dtype == "bf16" and not on_gpu:
        raise ConfigError("model.attention_impl=interleaved: MXNet's interleaved matmul ops are fp32-only on CPU; "
                          "with precision.dtype=bf16 use model.attention_impl=auto, fused or batch_dot")
    log.info("Transformer attention: %s (model.attention_impl=%s)", impl, mode)
    return impl


__all__ = ["ATTENTION_MODES", "FUSED_OPS_MODES", "build", "is_current", "load", "resolve", "resolve_attention",
           "unavailable_reason"]
