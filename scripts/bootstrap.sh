#!/usr/bin/env bash
# Idempotent set-up: Debian MPI packages, .venv with pinned deps, Horovod 0.28.1 built with MXNet + Gloo + MPI.
# Every step checks first and skips what is already good, so `make train` / `make test` can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
log() { printf '[bootstrap] %s\n' "$*"; }

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
stamp="$VENV/.deps-$(cat requirements.txt constraints.txt setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing Python dependencies (constraints.txt)"
  "$VPY" -m pip install -q "wheel" "setuptools<70"
  "$VPY" -m pip install -q -r requirements.txt -c constraints.txt
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi

# 4. Horovod from source against this MXNet (FIELD_NOTES recipe); skipped when the build check passes.
horovod_ok() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null | tr -d ' ' > "$VENV/.hvd-check" || return 1
  grep -q '\[X\]MXNet' "$VENV/.hvd-check" && grep -q '\[X\]Gloo' "$VENV/.hvd-check" \
    && grep -q '\[X\]MPI' "$VENV/.hvd-check"
}
if ! [ -x "$VENV/bin/horovodrun" ] || ! horovod_ok; then
  log "building horovod==0.28.1 with MXNet + Gloo + MPI (about 2 minutes)"
  HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS=-j2 \
    "$VPY" -m pip install -q --no-build-isolation --no-cache-dir "horovod==0.28.1" -c constraints.txt
  horovod_ok || { log "horovodrun --check-build does not list MXNet, Gloo and MPI:"; "$VENV/bin/horovodrun" --check-build; exit 1; }
fi
log "ready: $("$VPY" -c 'import mxnet, horovod, gluonnlp; print("mxnet", mxnet.__version__, "horovod", horovod.__version__, "gluonnlp", gluonnlp.__version__)')"
