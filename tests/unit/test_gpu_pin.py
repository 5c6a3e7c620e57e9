"""The GPU environment's pinned MXNet wheel (scripts/bootstrap.sh GPU=1) resolves on the package index."""
import re
import subprocess
import sys
import tempfile

import pytest

from support import ROOT


def test_pinned_cuda_mxnet_wheel_resolves():
    pin = re.search(r'^GPU_MXNET="([^"]+)"', (ROOT / "scripts" / "bootstrap.sh").read_text(), re.M).group(1)
    name, version = pin.split("==")
    wheel = f"{name.replace('-', '_')}-{version}-"
    with tempfile.TemporaryDirectory() as tmp:
        # `pip download --no-deps` of the pin; stopped once pip has resolved it and starts fetching the 499 MB file.
        proc = subprocess.Popen([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
                                 "-d", tmp, pin], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "Downloading" in line or "Saved" in line or "File was already downloaded" in line:
                    break
        finally:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    if any(s in text for s in ("NewConnectionError", "Could not fetch URL", "Temporary failure in name resolution",
                               "Network is unreachable")):
        pytest.skip(f"package index unreachable from this machine: {text.strip().splitlines()[-1]}")
    assert wheel in text and "manylinux" in text, f"{pin} did not resolve to a Linux wheel:\n{text}"
