"""The entry points re-execute themselves on tcmalloc (dist_nmt/allocator.py), once, and only when asked to."""
import os
import subprocess
import sys

import pytest

from dist_nmt import allocator
from support import ROOT

# Run in the re-executed child: is tcmalloc mapped into this process, and what did the guard see?
PROBE = ("import os; maps = open('/proc/self/maps').read(); "
         "print('tcmalloc' in maps, os.environ.get('DIST_NMT_ALLOCATOR_REEXEC'))")
ENTRY = f"from dist_nmt import allocator; allocator.preload_tcmalloc(['-c', {PROBE!r}]); print('not re-executed')"


def run_entry(**env_overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DIST_NMT_ALLOCATOR_REEXEC")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", ENTRY], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="libtcmalloc-minimal4 not installed (bootstrap.sh)")
def test_reexecutes_once_with_tcmalloc_mapped():
    assert run_entry() == "True 1"


def test_opt_out_keeps_the_system_allocator():
    assert run_entry(DIST_NMT_ALLOCATOR="system") == "not re-executed"


def test_already_preloaded_process_is_not_reexecuted():
    assert run_entry(DIST_NMT_ALLOCATOR_REEXEC="1") == "not re-executed"


def test_status_names_the_allocator(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
    assert allocator.status() == "tcmalloc (/usr/lib/libtcmalloc_minimal.so.4)"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("DIST_NMT_ALLOCATOR", "system")
    assert allocator.status().startswith("system malloc")


def test_onednn_primitive_cache_is_bounded_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(allocator.PRIMITIVE_CACHE_VAR, raising=False)
    allocator.bound_primitive_cache()
    assert allocator.primitive_cache_status() == "MXNET_MKLDNN_CACHE_NUM=1"
    assert os.environ[allocator.PRIMITIVE_CACHE_VAR] == "1"
    monkeypatch.setenv(allocator.PRIMITIVE_CACHE_VAR, "64")
    allocator.bound_primitive_cache()
    assert allocator.primitive_cache_status() == "MXNET_MKLDNN_CACHE_NUM=64"
