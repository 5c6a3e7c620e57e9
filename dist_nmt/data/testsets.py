"""The test sets a run decodes at the end: `data.test` plus `data.extra_tests`, resolved and checked up front.

    for test_set in resolve_test_sets(cfg.data):   # [] when data.test is empty; raises DataError on a bad file
        test_set.name, test_set.src, test_set.ref, test_set.tok_ref

Checked before training starts (every file exists, source/reference/tokenized-reference line counts agree), so a
typo fails in a second instead of after a 45-minute run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_nmt.config import DataConfig
from dist_nmt.data.text import count_lines, find_text_file
from dist_nmt.errors import DataError


@dataclass(frozen=True)
class TestSet:
    """One test set: `name` (file stem, e.g. test_2016_flickr), raw source/reference, optional tokenized reference."""

    __test__ = False  # not a pytest class

    name: str
    key: str  # the config key that named it, for messages
    src: Path
    ref: Path
    tok_ref: Path | None

    @property
    def is_primary(self) -> bool:
        """The `data.test` set (the one whose scores stay at the top level of test_scores.json)."""
        return self.key == "data.test"


def resolve_test_sets(data: DataConfig) -> list[TestSet]:
    """Resolve and check every configured test set (DataError naming the key and file on the first problem)."""
    if not data.test:
        return []
    entries = [("data.test", data.test, "data.test_tok_ref", data.test_tok_ref)]
    tok_refs = data.extra_test_tok_refs or ("",) * len(data.extra_tests)
    entries += [(f"data.extra_tests[{i}]", prefix, f"data.extra_test_tok_refs[{i}]", tok)
                for i, (prefix, tok) in enumerate(zip(data.extra_tests, tok_refs, strict=True))]
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data.root={data.root!r} does not exist (resolved to {root.resolve()})")
    out = [_resolve(root, data, *entry) for entry in entries]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise DataError(f"test sets {names} share a file name; their hypothesis files would collide "
                        "(data.test and data.extra_tests must name different files)")
    return out


def _resolve(root: Path, data: DataConfig, key: str, prefix: str, tok_key: str, tok_ref: str) -> TestSet:
    src = find_text_file(root, prefix, data.src_lang, key)
    ref = find_text_file(root, prefix, data.tgt_lang, key)
    tok = None
    if tok_ref:
        tok = root / tok_ref
        if not tok.is_file():
            raise DataError(f"{tok_key}={tok_ref!r}: no such file {tok}; fix the path (relative to data.root) "
                            "or set it to '' to skip tokenized BLEU")
    counts = {path: count_lines(path) for path in (src, ref, tok) if path is not None}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{path} has {n}" for path, n in counts.items())
        raise DataError(f"{key}={prefix!r}: line counts differ ({listed}); the files of one test set must be "
                        f"line-aligned (check {tok_key if tok else key})")
    return TestSet(Path(prefix).name, key, src, ref, tok)
