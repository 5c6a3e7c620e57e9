"""A user's mistakes fail at once: exit code, one ERROR line naming the file/key/line, no traceback, nothing on disk
changed. Most cases fail before any MXNet work; they share one prepared dir and one short trained run."""
import fcntl
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from support import FAST, PYTHON, ROOT, SHARED_DATA, TINY, run_cli, train

CLI = [PYTHON, "-m", "dist_nmt.cli"]
M30K = SHARED_DATA / "multi30k"


def snapshot(*dirs: Path) -> dict:
    """path -> sha256 of every file under `dirs` (the lock file and train.log, append-only, aside)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")) if Path(d).exists() else []:
            if p.is_file() and p.name not in (".lock", "train.log") and "heartbeat" not in p.parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(proc, code: int, *names: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if " ERROR " in line or line.startswith("dist-nmt: error")]
    assert len(errors) == 1, out[-3000:]
    for name in names:
        assert name in errors[0], errors[0]


def _write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def _head(name: str, n: int) -> list[str]:
    with gzip.open(M30K / "raw" / name, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A 3000-pair corpus (train from Multi30k, dev = val, alt dev = test2016) for cheap prepares."""
    root = tmp_path_factory.mktemp("small")
    for lang in ("en", "de"):
        _write_gz(root / f"train.{lang}.gz", _head(f"train.{lang}.gz", 3000))
        shutil.copy(M30K / "raw" / f"val.{lang}.gz", root / f"val.{lang}.gz")
        shutil.copy(M30K / "raw" / f"test_2016_flickr.{lang}.gz", root / f"test.{lang}.gz")
    return root


def small(root: Path, prepared: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.train=train", "data.dev=val", "data.test=", "data.vocab_size=600",
            f"data.prepared_dir={prepared}", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared) -> Path:
    """One short trained run (checkpoints at 2 and 4)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train([prepared, *FAST, f"train.run_dir={run_dir}", "train.max_updates=4", "train.save_every_updates=2"])
    return run_dir


@pytest.fixture
def guard(run, prepared):
    """Snapshot of the trained run and the prepared dir; asserts both are unchanged after the test."""
    dirs = [run, Path(prepared.split("=", 1)[1])]
    before = snapshot(*dirs)
    log = (run / "train.log").read_text()
    yield
    assert snapshot(*dirs) == before
    assert (run / "train.log").read_text().startswith(log)


# ---- config loader (through `train`) ------------------------------------------------------------------------------
CONFIG_CASES = {
    "unknown_key": (["train.bogus=1"], 2, "train.bogus"),
    "wrong_type": (["train.max_updates=abc"], 2, "train.max_updates"),
    "negative": (["optim.lr=-1"], 2, "optim.lr"),
    "bad_choice": (["model.arch=rnn"], 2, "model.arch"),
    "override_without_value": (["train.max_updates"], 2, "train.max_updates"),
    "heads_do_not_divide": (["model.transformer.num_heads=5"], 2, "num_heads"),
    "no_stop": (["train.max_updates=0"], 2, "train.max_updates"),
    "probability": (["model.transformer.dropout=1.5"], 2, "model.transformer.dropout"),
    "not_a_section": (["train.max_updates.x=1"], 2, "max_updates"),
    "fp16_on_cpu": (["precision.dtype=fp16"], 1, "fp16"),
    "accum_steps": (["train.accum_steps=0"], 2, "train.accum_steps"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_mistakes(case, run, prepared, guard):
    overrides, code, name = CONFIG_CASES[case]
    proc = train([prepared, *FAST, f"train.run_dir={run}", *overrides], check=False)
    assert_refused(proc, code, name)


def test_missing_config_file(tmp_path):
    proc = run_cli([*CLI, "train", "--config", str(tmp_path / "nope.yaml")], check=False)
    assert_refused(proc, 2, "nope.yaml")


def test_base_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert_refused(run_cli([*CLI, "train", "--config", str(tmp_path / "a.yaml")], check=False), 2, "loops")


def test_invalid_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert_refused(run_cli([*CLI, "train", "--config", str(tmp_path / "bad.yaml")], check=False), 2, "bad.yaml")


# ---- prepare --------------------------------------------------------------------------------------------------------
def _prepare(overrides: list[str]):
    return run_cli([*CLI, "prepare", "--config", TINY, *overrides], check=False)


def test_prepare_missing_root(tmp_path):
    assert_refused(_prepare([f"data.root={tmp_path / 'none'}", f"data.prepared_dir={tmp_path}/p"]), 2, "data.root")
    assert not (tmp_path / "p").exists()


def test_prepare_missing_split(small_root, tmp_path):
    assert_refused(_prepare(small(small_root, tmp_path / "p", "data.train=nope")), 2, "data.train")


@pytest.mark.parametrize("case", ["mismatch", "utf8", "empty", "tiny_vocab", "huge_vocab", "zero_kept"])
def test_prepare_bad_data(case, tmp_path):
    root = tmp_path / "root"
    src, tgt = ["a dog runs", "two men"], ["ein hund", "zwei männer"]
    extra = {"tiny_vocab": ["data.vocab_size=5"], "huge_vocab": ["data.vocab_size=5000"],
             "zero_kept": ["data.max_len=1", "data.vocab_size=30"]}.get(case, ["data.vocab_size=30"])
    if case == "mismatch":
        tgt = tgt[:1]
    if case == "empty":
        src, tgt = [], []
    files = {"train.en": src, "train.de": tgt, "dev.en": src[:1] or ["x"], "dev.de": tgt[:1] or ["y"]}
    for name, lines in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(line + "\n" for line in lines))
    if case == "utf8":
        (root / "train.en").write_bytes(b"a dog runs\n\xff\xfe broken\n")
    names = {"mismatch": "line-count", "utf8": "line 2", "empty": "no non-empty lines",
             "tiny_vocab": "data.vocab_size", "huge_vocab": "data.vocab_size", "zero_kept": "no training pair kept"}
    proc = _prepare([f"data.root={root}", "data.train=train", "data.dev=dev", "data.test=",
                     f"data.prepared_dir={tmp_path / 'p'}", *extra])
    assert_refused(proc, 2, names[case])
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))


def test_prepare_refuses_foreign_directory(small_root, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "mine.txt").write_text("keep me")
    assert_refused(_prepare(small(small_root, tmp_path / "p")), 2, "refusing to overwrite")
    assert (tmp_path / "p" / "mine.txt").read_text() == "keep me"


# ---- train: paths, prepared data, references, lock, resume ----------------------------------------------------------
def test_run_dir_is_a_file(tmp_path, prepared):
    (tmp_path / "f").write_text("x")
    assert_refused(train([prepared, *FAST, f"train.run_dir={tmp_path / 'f'}"], check=False), 2, "train.run_dir", "file")
    assert (tmp_path / "f").read_text() == "x"


def test_run_dir_below_a_file(tmp_path, prepared):
    (tmp_path / "f").write_text("x")
    assert_refused(train([prepared, *FAST, f"train.run_dir={tmp_path / 'f' / 'r'}"], check=False), 2, "is below")


def test_checkpoints_is_a_file(tmp_path, prepared):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoints").write_text("x")
    assert_refused(train([prepared, *FAST, f"train.run_dir={tmp_path / 'r'}"], check=False), 2, "checkpoints")


def test_no_prepared_data(tmp_path):
    proc = train([f"data.prepared_dir={tmp_path / 'none'}", *FAST, f"train.run_dir={tmp_path / 'r'}"], check=False)
    assert_refused(proc, 2, "prepare")


def test_vocab_size_differs_from_prepared(run, prepared, guard):
    proc = train([prepared, *FAST, f"train.run_dir={run}", "data.vocab_size=2000"], check=False)
    assert_refused(proc, 2, "data.vocab_size", "re-run dist-nmt prepare")


@pytest.mark.parametrize("case", ["missing", "wrong_length"])
def test_test_tok_ref_checked_before_training(case, tmp_path, prepared):
    ref = tmp_path / "ref.tok.de"
    if case == "wrong_length":
        ref.write_text("one line\n")
    proc = train([prepared, *FAST, f"train.run_dir={tmp_path / 'r'}", "data.test=raw/test_2016_flickr",
                  f"data.test_tok_ref={ref}", "train.max_updates=2"], check=False)
    assert_refused(proc, 2, "data.test_tok_ref")
    assert not list((tmp_path / "r").glob("checkpoints/ckpt-*"))


def test_second_trainer_is_refused(run, prepared, guard):
    with open(run / ".lock", "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("host elsewhere pid 4242\n")
        fh.flush()
        proc = train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=6"], check=False)
        fh.truncate(0)
    assert_refused(proc, 1, "in use by another training run", "pid 4242")


def test_resume_with_other_shape_is_refused(run, prepared, guard):
    proc = train([prepared, *FAST, f"train.run_dir={run}", "train.max_updates=6", "model.transformer.d_ff=32"],
                 check=False)
    assert_refused(proc, 1, "model.transformer.d_ff")


def test_raw_data_edited_after_prepare(small_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_root, root)
    prepared = tmp_path / "p"
    run_cli([*CLI, "prepare", "--config", TINY, *small(root, prepared)])
    _write_gz(root / "train.en.gz", _head("train.en.gz", 2999) + ["an edited line"])
    before = snapshot(prepared)
    proc = train([*small(root, prepared), *FAST, f"train.run_dir={tmp_path / 'r'}"], check=False)
    assert_refused(proc, 2, "re-run dist-nmt prepare", "train text")
    assert snapshot(prepared) == before


def test_dev_sentence_too_long_names_dev(small_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_root, root)
    for lang in ("en", "de"):
        _write_gz(root / f"val.{lang}.gz", ["a short one", "word " * 1200])  # > train.max_tokens=1024 as one row
    prepared = tmp_path / "p"
    run_cli([*CLI, "prepare", "--config", TINY, *small(root, prepared)])
    proc = train([*small(root, prepared), *FAST, f"train.run_dir={tmp_path / 'r'}"], check=False)
    assert_refused(proc, 2, "data.dev", "train.max_tokens")
    assert "data.max_len does not apply" in proc.stderr


# ---- translate ------------------------------------------------------------------------------------------------------
def _translate(run, *args, stdin=None):
    import subprocess

    return subprocess.run([*CLI, "translate", "--run-dir", str(run), *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _text(proc):
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


@pytest.mark.parametrize("case", ["beam", "nbest", "alpha", "nbest_over_beam", "input_missing", "input_dir",
                                  "output_dir_missing", "output_is_dir", "params_missing", "params_garbage",
                                  "stdin_utf8", "file_utf8"])
def test_translate_mistakes(case, run, tmp_path, guard):
    good = tmp_path / "in.en"
    good.write_text("A dog.\n")
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"ok\nfine\n\xc3\x28 broken\n")
    garbage = tmp_path / "g.params"
    garbage.write_bytes(b"not params")
    args, stdin, name, code = {
        "beam": (["--beam", "-1", "--input", good], None, "--beam", 2),
        "nbest": (["--nbest", "0", "--input", good], None, "--nbest", 2),
        "alpha": (["--alpha", "-1", "--input", good], None, "--alpha", 2),
        "nbest_over_beam": (["--nbest", "5", "--beam", "2", "--input", good], None, "--nbest", 2),
        "input_missing": (["--input", tmp_path / "none.en"], None, "none.en", 2),
        "input_dir": (["--input", tmp_path], None, "directory", 2),
        "output_dir_missing": (["--input", good, "--output", tmp_path / "no" / "out.de"], None, "does not exist", 2),
        "output_is_dir": (["--input", good, "--output", tmp_path], None, "is a directory", 2),
        "params_missing": (["--input", good, "--params", tmp_path / "x.params"], None, "x.params", 2),
        "params_garbage": (["--input", good, "--params", garbage], None, "g.params", 1),
        "stdin_utf8": ([], b"ok\n\xff\n", "stdin: line 2", 2),
        "file_utf8": (["--input", bad], None, "line 3", 2),
    }[case]
    assert_refused(_text(_translate(run, *args, stdin=stdin)), code, name)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("case", ["missing", "file", "untrained"])
def test_translate_bad_run_dir(case, tmp_path):
    target = {"missing": tmp_path / "none", "file": tmp_path / "f", "untrained": tmp_path}[case]
    (tmp_path / "f").write_text("x")
    assert_refused(_text(_translate(target, "--input", tmp_path / "f")), 2, "--run-dir")


def test_translate_writes_one_line_per_input_line(run, tmp_path):
    lines = ["A dog.", "with\u2028line separator", "form\x0cfeed\x1e", "", "vertical\x0btab", "crlf\r"]
    src = tmp_path / "in.en"
    src.write_bytes("".join(line + "\n" for line in lines).encode())
    proc = _text(_translate(run, "--input", src, "--output", tmp_path / "out.de"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out.de").read_bytes().count(b"\n") == len(lines)
    piped = _translate(run, stdin=src.read_bytes())
    assert piped.returncode == 0 and piped.stdout.count(b"\n") == len(lines)


# ---- evaluate -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty_hyp", "missing_ref", "ref_length", "tok_ref_length", "hyp_utf8"])
def test_evaluate_mistakes(case, tmp_path):
    hyp, ref, tok = tmp_path / "h.de", tmp_path / "r.de", tmp_path / "t.de"
    hyp.write_text("" if case == "empty_hyp" else "ein hund\nzwei\n")
    if case == "hyp_utf8":
        hyp.write_bytes(b"ein\n\xff\n")
    ref.write_text("ein hund\n" if case == "ref_length" else "ein hund\nzwei\n")
    tok.write_text("ein\n")
    args = ["--hyp", hyp, "--ref", tmp_path / "none.de" if case == "missing_ref" else ref]
    if case == "tok_ref_length":
        args += ["--tok-ref", tok]
    name = {"empty_hyp": "empty", "missing_ref": "none.de", "ref_length": "--ref", "tok_ref_length": "--tok-ref",
            "hyp_utf8": "line 2"}[case]
    assert_refused(run_cli([*CLI, "evaluate", *map(str, args)], check=False), 2, name)


# ---- average --------------------------------------------------------------------------------------------------------
def test_average_without_checkpoints(tmp_path, run):
    (tmp_path / "r").mkdir()
    shutil.copy(run / "config.yaml", tmp_path / "r" / "config.yaml")
    proc = run_cli([*CLI, "average", "--run-dir", str(tmp_path / "r"), "--output", str(tmp_path / "a.params")],
                   check=False)
    assert_refused(proc, 1, "no checkpoints")
    assert not (tmp_path / "a.params").exists()


def test_average_corrupt_checkpoint(tmp_path, run):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    params = sorted((copy / "checkpoints").glob("ckpt-*"))[-1] / "model.params"
    params.write_bytes(params.read_bytes()[:100])
    proc = run_cli([*CLI, "average", "--run-dir", str(copy), "--last", "2", "--output", str(tmp_path / "a.params")],
                   check=False)
    assert_refused(proc, 1, "model.params", "sha256")
    assert not (tmp_path / "a.params").exists() and params.stat().st_size == 100


@pytest.mark.parametrize("case", ["last_zero", "output_dir_missing", "run_dir_missing"])
def test_average_mistakes(case, tmp_path, run, guard):
    args = {"last_zero": ["--run-dir", run, "--last", "0", "--output", tmp_path / "a.params"],
            "output_dir_missing": ["--run-dir", run, "--output", tmp_path / "no" / "a.params"],
            "run_dir_missing": ["--run-dir", tmp_path / "none", "--output", tmp_path / "a.params"]}[case]
    name = {"last_zero": "--last", "output_dir_missing": "does not exist", "run_dir_missing": "--run-dir"}[case]
    assert_refused(run_cli([*CLI, "average", *map(str, args)], check=False), 2, name)
