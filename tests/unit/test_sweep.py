"""scripts/sweep.py: run summaries read by hand from a metrics file; shipped sweep files are valid configs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from dist_nmt.config import load_config

_spec = importlib.util.spec_from_file_location("sweep", Path("scripts/sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_summary_reads_curve_updates_speed_and_test(tmp_path):
    records = [{"kind": "train", "update": 50, "time": 60.0, "tokens_per_s": 1000.0, "peak_rss_gb": 1.5},
               {"kind": "valid", "update": 50, "time": 90.0, "bleu": 5.0, "ppl": 30.0},
               {"kind": "train", "update": 100, "time": 150.0, "tokens_per_s": 3000.0, "peak_rss_gb": 2.5},
               {"kind": "valid", "update": 100, "time": 180.0, "bleu": 4.0, "ppl": 20.0},
               {"kind": "test", "update": 100, "time": 200.0, "bleu": 6.5, "tok_bleu": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = sweep.summarize(tmp_path)
    assert summary["dev_bleu_curve"] == [[50, 1.5, 5.0, 30.0], [100, 3.0, 4.0, 20.0]]
    assert (summary["updates"], summary["tokens_per_s"], summary["peak_rss_gb"]) == (100, 2000.0, 2.5)
    assert (summary["final_dev_bleu"], summary["best_dev_bleu"]) == (4.0, 5.0)
    assert (summary["test_bleu"], summary["test_tok_bleu"]) == (6.5, 7.0)
    assert sweep.summarize(tmp_path / "missing")["updates"] == 0


def test_command_puts_budget_and_run_dir_last():
    cmd = sweep.command("c.yaml", ["optim.lr=1"], {"minutes": 10}, Path("runs/x"))
    assert cmd[1:] == ["-m", "dist_nmt.train", "--config", "c.yaml", "optim.lr=1", "train.max_time_minutes=10",
                       "train.run_dir=runs/x"]
    assert sweep.command("c.yaml", [], {"updates": 300}, Path("runs/x"))[-2] == "train.max_updates=300"


@pytest.mark.parametrize("path", sorted(Path("scripts/sweeps").glob("*.yaml")))
def test_every_run_of_a_shipped_sweep_is_a_valid_config(path):
    spec = sweep.load_sweep(path)
    for run in spec["runs"]:
        budget = {key: spec[key] for key in ("minutes", "updates") if key in spec}
        overrides = sweep.command(spec["config"], list(spec.get("common", [])) + run["overrides"], budget,
                                  Path("runs/x"))[5:]
        load_config(spec["config"], overrides)
    assert yaml.safe_load(path.read_text())["runs"][0]["overrides"] == [], "first run is the unchanged baseline"


def test_only_selects_named_runs_in_file_order_and_rejects_unknown_names():
    runs = [{"name": n, "overrides": []} for n in ("baseline", "lr", "dropout")]
    assert [r["name"] for r in sweep.select_runs(runs, {"lr"}, None, Path("s.yaml"))] == ["baseline", "dropout"]
    assert [r["name"] for r in sweep.select_runs(runs, set(), "dropout,baseline", Path("s.yaml"))] == \
        ["baseline", "dropout"]
    with pytest.raises(SystemExit, match="no run named typo in s.yaml; its runs are: baseline, lr, dropout"):
        sweep.select_runs(runs, set(), "lr,typo", Path("s.yaml"))
