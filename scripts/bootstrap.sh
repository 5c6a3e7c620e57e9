#!/usr/bin/env bash
# Idempotent set-up: Debian MPI packages, .venv with pinned deps, Horovod 0.28.1 built with MXNet + Gloo + MPI.
# GPU=1 (`make bootstrap GPU=1`): the CUDA 11.2 wheel of MXNet instead of the CPU one and Horovod built with
# HOROVOD_GPU_OPERATIONS=NCCL (needs the CUDA toolkit and NCCL headers/libraries, e.g. the nvidia/cuda devel image;
# set HOROVOD_NCCL_HOME if NCCL is not in a system path); the build check then also requires NCCL.
# Every step checks first and skips what is already good, so `make train` / `make test` can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
log() { printf '[bootstrap] %s\n' "$*"; }
GPU=${GPU:-0}
GPU_MXNET="mxnet-cu112==1.9.1"  # wheel mxnet_cu112-1.9.1-py3-none-manylinux2014_x86_64.whl (499 MB) on PyPI

# 1. System packages (Open MPI for Horovod's MPI controller and mpi4py).
# iproute2: the two-host (network namespace) test; iptables: packet loss in the simulated cluster when the kernel
# has no sch_netem; tcmalloc: MXNet CPU buffers without page faults (dist_nmt/allocator.py)
DEB_PACKAGES="libopenmpi-dev openmpi-bin iproute2 iptables libtcmalloc-minimal4"
if ! dpkg -s $DEB_PACKAGES >/dev/null 2>&1; then
  log "installing Debian packages $DEB_PACKAGES"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $DEB_PACKAGES >/dev/null
fi

# 2. Virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 3. Pinned Python deps; skipped when the stamp matches requirements + constraints.
stamp="$VENV/.deps-gpu$GPU-$(cat requirements.txt constraints.txt setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing Python dependencies (constraints.txt)"
  "$VPY" -m pip install -q "wheel" "setuptools<70"
  if [ "$GPU" = 1 ]; then  # same pins, with the CUDA wheel in place of the CPU one
    grep -v '^mxnet==' requirements.txt > "$VENV/requirements-gpu.txt"
    grep -v '^mxnet==' constraints.txt > "$VENV/constraints-gpu.txt"
    "$VPY" -m pip uninstall -q -y mxnet 2>/dev/null || true
    "$VPY" -m pip install -q "$GPU_MXNET" -r "$VENV/requirements-gpu.txt" -c "$VENV/constraints-gpu.txt"
  else
    "$VPY" -m pip uninstall -q -y mxnet-cu112 2>/dev/null || true
    "$VPY" -m pip install -q -r requirements.txt -c constraints.txt
  fi
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi

# 4. Horovod from source against this MXNet (FIELD_NOTES recipe); skipped when the build check passes.
horovod_ok() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null | tr -d ' ' > "$VENV/.hvd-check" || return 1
  grep -q '\[X\]MXNet' "$VENV/.hvd-check" && grep -q '\[X\]Gloo' "$VENV/.hvd-check" \
    && grep -q '\[X\]MPI' "$VENV/.hvd-check" && { [ "$GPU" != 1 ] || grep -q '\[X\]NCCL' "$VENV/.hvd-check"; }
}
GPU_BUILD=""; [ "$GPU" = 1 ] && GPU_BUILD="HOROVOD_GPU_OPERATIONS=NCCL"
if ! [ -x "$VENV/bin/horovodrun" ] || ! horovod_ok; then
  log "building horovod==0.28.1 with MXNet + Gloo + MPI${GPU_BUILD:+ + NCCL} (about 2 minutes)"
  "$VPY" -m pip uninstall -q -y horovod 2>/dev/null || true  # a CPU-only build must not survive a switch to GPU
  env $GPU_BUILD HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS=-j2 \
    "$VPY" -m pip install -q --no-build-isolation --no-cache-dir "horovod==0.28.1" -c constraints.txt
  horovod_ok || { log "horovodrun --check-build does not list MXNet, Gloo, MPI${GPU_BUILD:+ and NCCL}:"; "$VENV/bin/horovodrun" --check-build; exit 1; }
fi
# 5. Fused CPU operator library (dist_nmt/ops/fused_ops.cc -> dist_nmt/ops/libdist_nmt_ops.so), rebuilt when the
# source, flags or MXNet's lib_api change. Without g++ training still runs on the pure-MXNet path (model.fused_ops=auto).
if command -v "${CXX:-g++}" >/dev/null 2>&1; then
  "$VPY" -m dist_nmt.ops build || log "WARNING: building the fused ops failed; model.fused_ops=auto falls back to pure MXNet"
else
  log "WARNING: no g++ on PATH: fused CPU ops not built (apt-get install g++); model.fused_ops=auto uses pure MXNet"
fi
log "ready: $("$VPY" -c 'import mxnet, horovod, gluonnlp; print("mxnet", mxnet.__version__, "horovod", horovod.__version__, "gluonnlp", gluonnlp.__version__)')"
