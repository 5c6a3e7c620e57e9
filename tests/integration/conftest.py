"""Fixture: Multi30k prepared once per session with the tiny config's 1k vocabulary."""
import pytest

from support import PYTHON, TINY, run_cli


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> str:
    """The `data.prepared_dir=...` override pointing at the prepared arrays."""
    out = tmp_path_factory.mktemp("data-bin") / "multi30k-1k"
    run_cli([PYTHON, "-m", "dist_nmt.cli", "prepare", "--config", TINY, f"data.prepared_dir={out}"])
    return f"data.prepared_dir={out}"
