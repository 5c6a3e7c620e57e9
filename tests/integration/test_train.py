"""The real trainer on one process: learning, checkpoints, exact resume, refusals, bad numbers, translate."""
import json
import shutil

import mxnet as mx
import numpy as np
import pytest

from dist_nmt import allocator
from support import (
    FAST,
    PYTHON,
    SHARED_DATA,
    assert_test_decoded_by_chosen_model,
    head_gz,
    metrics,
    run_cli,
    small_test_sets,
    train,
)


def _params(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def _final_params(run_dir) -> dict[str, np.ndarray]:
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    return _params(ckpts[-1] / "model.params")


def test_training_lowers_loss_and_reports_bleu(tmp_path, prepared):
    run = tmp_path / "run"
    proc = train([prepared, f"train.run_dir={run}", "train.max_updates=40", "train.log_every_updates=10",
                  "train.eval_every_updates=30", "data.test=raw/test_2016_flickr", "train.eval_sample_sentences=8"])
    losses = [r["loss"] for r in metrics(run, "train")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    rss = [r["peak_rss_gb"] for r in metrics(run, "train")]  # a running maximum, in GB
    assert 0.2 < rss[0] <= rss[-1] < 8 and "peak RSS" in proc.stderr, rss
    valid = metrics(run, "valid")
    assert [r["update"] for r in valid] == [30, 40] and valid[0]["sentences"] == 8  # and the final model
    scores = json.loads((run / "test_scores.json").read_text())
    assert scores["sentences"] == 1000 and "tok:13a" in scores["bleu_signature"]
    assert len((run / "test.hyp.de").read_text().splitlines()) == 1000
    assert "TEST test_2016_flickr.en.gz" in proc.stderr and (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "best" / "MANIFEST.json").is_file()
    if allocator.find_tcmalloc():  # the command line re-executed itself on tcmalloc (dist_nmt/allocator.py)
        assert "allocator: tcmalloc" in proc.stderr
    assert "oneDNN primitive cache: MXNET_MKLDNN_CACHE_NUM=1" in proc.stderr  # bounded before mxnet loaded


def test_resume_equals_uninterrupted(tmp_path, prepared):
    full, split = tmp_path / "full", tmp_path / "split"
    common = [prepared, *FAST]
    train([*common, f"train.run_dir={full}", "train.max_updates=12"])
    train([*common, f"train.run_dir={split}", "train.max_updates=5"])
    proc = train([*common, f"train.run_dir={split}", "train.max_updates=12"])
    assert "resumed from" in proc.stderr and "at update 5" in proc.stderr
    a, b = _final_params(full), _final_params(split)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)


def test_resume_switches_attention_implementation(tmp_path, prepared):
    """Every attention implementation reads the same checkpoints: a batch_dot run resumes on the interleaved ops."""
    run = tmp_path / "run"
    common = [prepared, *FAST, f"train.run_dir={run}", "train.save_every_updates=3", "train.log_every_updates=1"]
    train([*common, "train.max_updates=3", "model.attention_impl=batch_dot"])
    proc = train([*common, "train.max_updates=6", "model.attention_impl=interleaved"])
    assert "resumed from" in proc.stderr and "at update 3" in proc.stderr
    assert "Transformer attention: interleaved" in proc.stderr
    assert [r["update"] for r in metrics(run, "train")] == [1, 2, 3, 4, 5, 6]


def test_corrupt_latest_checkpoint_falls_back_and_shape_change_is_refused(tmp_path, prepared):
    run = tmp_path / "run"
    common = [prepared, *FAST, f"train.run_dir={run}"]
    train([*common, "train.max_updates=4", "train.save_every_updates=2"])
    latest = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    (latest / "optimizer.nd").write_bytes(b"truncated")
    proc = train([*common, "train.max_updates=6", "train.save_every_updates=2"])
    assert "skipping corrupt checkpoint" in proc.stderr and "at update 2" in proc.stderr
    refused = train([*common, "train.max_updates=8", "model.transformer.d_model=32"], check=False)
    assert refused.returncode == 1
    assert "model.transformer.d_model (checkpoint 64, now 32)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_nan_updates_are_skipped_then_fatal_with_good_checkpoint(tmp_path, prepared):
    run = tmp_path / "run"
    common = [prepared, *FAST, f"train.run_dir={run}", "train.save_every_updates=3", "train.log_every_updates=1"]
    proc = train([*common, "train.max_updates=8"], env={"DIST_NMT_INJECT_NAN": "5"})
    assert "update 5 skipped" in proc.stderr
    assert metrics(run, "train")[-1]["skipped"] == 1
    fatal = train([*common, "train.run_dir=" + str(tmp_path / "r2"), "train.max_updates=20",
                   "train.max_consecutive_bad_updates=3"], env={"DIST_NMT_INJECT_NAN": "4,5,6,7"}, check=False)
    assert fatal.returncode == 1 and "3 consecutive updates had non-finite" in fatal.stderr
    assert "Last good checkpoint: " in fatal.stderr and "ckpt-00000003" in fatal.stderr


def test_translate_keeps_line_alignment(tmp_path, prepared):
    run = tmp_path / "run"
    train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=2"])
    lines = ["A dog runs.", "", "word " * 400, "   ", "Two men play football."]
    src = tmp_path / "in.en"
    src.write_text("\n".join(lines) + "\n")
    proc = run_cli([PYTHON, "-m", "dist_nmt.cli", "translate", "--run-dir", str(run), "--input", str(src),
                    "--output", str(tmp_path / "out.de")])
    out = (tmp_path / "out.de").read_text().split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""  # one line per input line, newline-terminated
    assert out[1] == "" and out[3] == ""
    assert "truncated" in proc.stderr


def test_average_checkpoints_cli(tmp_path, prepared):
    run = tmp_path / "run"
    train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=4", "train.save_every_updates=2"])
    out = tmp_path / "avg.params"
    run_cli([PYTHON, "-m", "dist_nmt.cli", "average", "--run-dir", str(run), "--last", "2", "--output", str(out)])
    ckpts = sorted((run / "checkpoints").glob("ckpt-*"))[-2:]
    first, second = (_params(p / "model.params") for p in ckpts)
    avg = _params(out)
    assert avg.keys() == first.keys()
    for name in avg:
        np.testing.assert_allclose(avg[name], (first[name] + second[name]) / 2, atol=1e-6)


def test_last_k_average_competes_on_dev_and_every_test_set_is_scored(tmp_path, prepared):
    run = tmp_path / "run"
    proc = train([prepared, f"train.run_dir={run}", "train.max_updates=6", "train.save_every_updates=2",
                  "train.eval_every_updates=3", "train.eval_sample_sentences=8", "train.keep_last=5",
                  "train.average_last=3", *small_test_sets(tmp_path)])
    averaged = _params(run / "checkpoints" / "average.params")
    last3 = [_params(p / "model.params") for p in sorted((run / "checkpoints").glob("ckpt-*"))[-3:]]
    assert [p.name for p in sorted((run / "checkpoints").glob("ckpt-*"))[-3:]] == \
        ["ckpt-00000003", "ckpt-00000004", "ckpt-00000006"]
    assert averaged.keys() == last3[0].keys()
    for name in averaged:
        np.testing.assert_allclose(averaged[name], sum(p[name] for p in last3) / 3, rtol=1e-6, atol=1e-7)
    scores = json.loads((run / "test_scores.json").read_text())
    candidates = scores["candidates_dev_bleu"]
    assert set(candidates) == {"best", "average-last-3"} and "candidate average-last-3: dev BLEU" in proc.stderr
    assert candidates["best"] == max(r["bleu"] for r in metrics(run, "valid"))
    assert scores["model"] in candidates and candidates[scores["model"]] == max(candidates.values())
    assert scores["test_set"] == "test_2016_flickr" and scores["sentences"] == 40
    extra = scores["extra_tests"]["test_2017_flickr"]
    assert extra["sentences"] == 40 and "tok_bleu" in extra and "tok:13a" in extra["bleu_signature"]
    for source in ("test_2016_flickr.en.gz", "test_2017_flickr.en.gz"):
        assert f"TEST {source} ({scores['model']} model; dev BLEU best " in proc.stderr
    assert len((run / "test.hyp.de").read_text().splitlines()) == 40
    assert len((run / "test.test_2017_flickr.hyp.de").read_text().splitlines()) == 40
    assert metrics(run, "test.test_2017_flickr")[0]["tok_bleu"] == extra["tok_bleu"]
    assert_test_decoded_by_chosen_model(tmp_path, run, scores["model"])


def test_misaligned_test_set_fails_before_training(tmp_path, prepared):
    overrides = small_test_sets(tmp_path)
    head_gz(SHARED_DATA / "multi30k" / "tok" / "test_2017_flickr.lc.norm.tok.de.gz",
          tmp_path / "test_2017_flickr.tok.de.gz", 39)
    proc = train([prepared, *FAST, f"train.run_dir={tmp_path / 'run'}", "train.max_updates=2", *overrides[:1],
                  *overrides[2:]], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.extra_tests[0]=" in proc.stderr and "test_2017_flickr.tok.de.gz has 39" in proc.stderr
    assert "training transformer" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(autouse=True)
def _cleanup_runs(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
