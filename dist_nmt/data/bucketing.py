"""Shape classes: which sentences share a padded (rows, src_len, tgt_len) batch shape, fixed for the whole run.

    plan = plan_buckets(src_lengths, tgt_lengths, max_tokens=4096, num_shards=2)
    plan.shapes                 # [(rows, src_pad_len, tgt_pad_len), ...] one per class
    plan.group_of[i]            # class of sentence i

Each side is padded to its own length: a pair needs src_len + 1 source positions (EOS) and tgt_len + 1 target
positions (BOS on `tgt_in`, EOS on `tgt_out`). Needs are first rounded up to a grid that is exact for short
sentences and coarser for long ones (`GRID`: step 1 up to 32, 2 up to 64, 4 up to 128, then 8), so a class's
padded lengths are grid values. Classes are rectangles of the (src need, tgt need) plane found by a two-level
("guillotine") dynamic programme over the length histogram: the major side (source or target, whichever gives the
cheaper plan) is cut into ranges, and each range's other side is cut again. It minimises

    padded slots (dummy rows included) + BATCH_COST * max_tokens per batch + SHAPE_COST * real tokens per class,

so boundaries are fine where sentences are dense, and a new shape must pay for itself (SHAPE_COST = 0.001: it must
save 0.1 % of an epoch's tokens; the number of classes stays a few dozen whatever the corpus size).

Budget (per side): a batch of class g has rows[g] rows with rows * max(src_pad_len, tgt_pad_len) <= max_tokens,
so neither side's padded slots exceed max_tokens. rows[g] is a multiple of `rows_multiple` (ROWS_MULTIPLE), the
same for every batch of the class (one shape per class). Each class gives a multiple of `num_shards` batches, so
every rank gets the same number of batches and all ranks draw the same class (the same shape) at each global step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_nmt.data.text import DataError

# Rows of every batch are a multiple of this. Every batch of a class has the same row count, so the multiple no longer
# limits the number of shapes; 1 keeps dummy rows to at most one per batch (8 costs ~1 point of padding efficiency at
# 8 shards on Multi30k, for GEMM alignment that CPUs do not need).
ROWS_MULTIPLE = 1
SHAPE_COST = 0.001  # a class must save this fraction of the epoch's real tokens in padded slots
BATCH_COST = 0.03  # fixed cost of one batch (update, collectives, per-op overhead) in units of max_tokens slots
MAX_RANGE_ATOMS = 12  # widest major-side range the planner considers, in atoms (see _atoms)
_INF = float("inf")


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def grid_length(need: np.ndarray | int) -> np.ndarray:
    """Round padded lengths up to the grid: exact up to 32, then multiples of 2 up to 64, 4 up to 128, else 8."""
    need = np.asarray(need, dtype=np.int64)
    step = np.where(need <= 32, 1, np.where(need <= 64, 2, np.where(need <= 128, 4, 8)))
    return _round_up(need, step)


def max_rows_for(pad_len: int, max_tokens: int, rows_multiple: int = ROWS_MULTIPLE) -> int:
    """Most rows a batch whose longer side is `pad_len` may have: a multiple of rows_multiple, rows * L <= budget."""
    rows = (max_tokens // pad_len) // rows_multiple * rows_multiple
    if rows == 0:
        raise DataError(f"max_tokens={max_tokens} cannot hold {rows_multiple} rows of padded length {pad_len}; raise "
                        f"train.max_tokens to at least {pad_len * rows_multiple} or lower data.max_len")
    return rows


@dataclass(frozen=True)
class BucketPlan:
    """Epoch-independent grouping: sentences of class g form num_batches[g] batches (a multiple of num_shards) of
    shape (rows[g], src_pad_lens[g]) / (rows[g], tgt_pad_lens[g])."""

    group_of: np.ndarray  # (N,) class id of every sentence
    src_pad_lens: tuple[int, ...]
    tgt_pad_lens: tuple[int, ...]
    rows: tuple[int, ...]
    num_batches: tuple[int, ...]
    num_shards: int

    @property
    def batches_per_shard(self) -> int:
        """Batches each rank gets per epoch (= global steps per epoch)."""
        return sum(self.num_batches) // self.num_shards

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """(rows, src_pad_len, tgt_pad_len) of every class: the distinct batch shapes of an epoch."""
        return list(zip(self.rows, self.src_pad_lens, self.tgt_pad_lens, strict=True))


@dataclass(frozen=True)
class _Costs:
    max_tokens: int
    num_shards: int
    rows_multiple: int
    batch: float  # per batch, in slots
    shape: float  # per class, in slots


def _class_cost(count: np.ndarray, major: np.ndarray, minor: int, costs: _Costs) -> np.ndarray:
    """Cost of classes of `count` sentences padded to (major, minor); 0 if empty, inf if they cannot fill
    num_shards non-empty batches."""
    max_rows = (costs.max_tokens // np.maximum(major, minor)) // costs.rows_multiple * costs.rows_multiple
    batches = _round_up(-(-count // np.maximum(max_rows, 1)), costs.num_shards)
    rows = _round_up(-(-count // np.maximum(batches, 1)), costs.rows_multiple)
    cost = batches * rows * (major + minor) + batches * costs.batch + costs.shape
    return np.where(count == 0, 0.0, np.where((count < batches) | (max_rows == 0), _INF, cost))


def _inner_dp(hists: np.ndarray, majors: np.ndarray, minor_values: np.ndarray, costs: _Costs,
              ) -> tuple[np.ndarray, np.ndarray]:
    """For each row r of `hists` (R, n), the cheapest cut of the minor values into ranges; all rows at once.

    Returns (best cost per row (R,), back-pointers (R, n + 1)).
    """
    num, n = hists.shape
    cum = np.concatenate([np.zeros((num, 1), np.int64), np.cumsum(hists, axis=1)], axis=1)
    best = np.full((num, n + 1), _INF)
    best[:, 0] = 0.0
    back = np.zeros((num, n + 1), np.int32)
    for j in range(1, n + 1):
        count = cum[:, j:j + 1] - cum[:, :j]  # (R, j): sentences in minor range [i, j)
        total = best[:, :j] + _class_cost(count, majors[:, None], int(minor_values[j - 1]), costs)
        back[:, j] = np.argmin(total, axis=1)
        best[:, j] = total[np.arange(num), back[:, j]]
    return best[:, n], back


def _atoms(counts: np.ndarray, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) groups of major values holding >= num_shards sentences each (sparse tails merge)."""
    atoms, start, held = [], 0, 0
    for v, c in enumerate(counts):
        held += int(c)
        if held >= num_shards:
            atoms.append((start, v + 1))
            start, held = v + 1, 0
    if start < len(counts):
        if not atoms:
            raise DataError(f"only {held} sentences for num_shards={num_shards}: every rank needs at least one "
                            "sentence per step; use fewer processes or more data")
        atoms[-1] = (atoms[-1][0], len(counts))
    return atoms


def _guillotine(hist: np.ndarray, major_values: np.ndarray, minor_values: np.ndarray, costs: _Costs,
                ) -> tuple[float, list[tuple[int, int, int, int]]]:
    """Cheapest two-level cut of `hist` (major x minor): total cost and classes as (maj_lo, maj_hi, min_lo, min_hi)
    index ranges [lo, hi)."""
    atoms = _atoms(hist.sum(axis=1), costs.num_shards)
    cum = np.concatenate([np.zeros((1, hist.shape[1]), np.int64), np.cumsum(hist, axis=0)])
    spans = [(a, b) for a in range(len(atoms)) for b in range(a + 1, min(len(atoms), a + MAX_RANGE_ATOMS) + 1)]
    if (0, len(atoms)) not in spans:
        spans.append((0, len(atoms)))  # everything in one range is always a candidate (tiny data)
    lo = np.array([atoms[a][0] for a, _ in spans])
    hi = np.array([atoms[b - 1][1] for _, b in spans])
    range_cost, back = _inner_dp(cum[hi] - cum[lo], major_values[hi - 1], minor_values, costs)
    index = {span: r for r, span in enumerate(spans)}
    best, choice = [0.0] + [_INF] * len(atoms), [0] * (len(atoms) + 1)
    for b in range(1, len(atoms) + 1):
        for a in range(b):
            r = index.get((a, b))
            if r is not None and best[a] + range_cost[r] < best[b]:
                best[b], choice[b] = best[a] + range_cost[r], a
    if best[-1] == _INF:
        raise DataError(f"cannot split {int(hist.sum())} sentences into a multiple of num_shards={costs.num_shards} "
                        f"non-empty batches of <= max_tokens={costs.max_tokens} slots; raise train.max_tokens or use "
                        "fewer processes")
    classes, b = [], len(atoms)
    while b > 0:
        a, r = choice[b], index[choice[b], b]
        j = hist.shape[1]
        while j > 0:
            i = int(back[r, j])
            classes.append((int(lo[r]), int(hi[r]), i, j))
            j = i
        b = a
    return best[-1], classes


def plan_buckets(src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, num_shards: int,
                 rows_multiple: int = ROWS_MULTIPLE) -> BucketPlan:
    """Group pairs into shape classes (see the module docstring) and size every class's batches."""
    if num_shards < 1 or rows_multiple < 1:
        raise ValueError(f"num_shards and rows_multiple must be >= 1, got {num_shards} and {rows_multiple}")
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target lengths")
    if len(src_lengths) < num_shards:
        raise DataError(f"only {len(src_lengths)} sentences for num_shards={num_shards}: every rank needs at least "
                        "one sentence per step; use fewer processes or more data")
    src_need, tgt_need = np.asarray(src_lengths) + 1, np.asarray(tgt_lengths) + 1
    longest = int(max(src_need.max(), tgt_need.max()))
    grid = grid_length(np.arange(longest + 1)).astype(np.int32)  # a lookup table: fast on millions of pairs
    max_rows_for(int(grid[longest]), max_tokens, rows_multiple)  # the longest pair fits
    width = int(grid[longest]) + 1
    cell = grid[src_need] * width + grid[tgt_need]  # (N,) flat (src pad, tgt pad) cell of every pair
    full = np.bincount(cell, minlength=width * width).reshape(width, width)
    src_values, tgt_values = np.flatnonzero(full.sum(axis=1)), np.flatnonzero(full.sum(axis=0))
    hist = full[np.ix_(src_values, tgt_values)]
    real_tokens = float(hist.sum(axis=1) @ src_values + hist.sum(axis=0) @ tgt_values)
    costs = _Costs(max_tokens, num_shards, rows_multiple, BATCH_COST * max_tokens, SHAPE_COST * real_tokens)
    src_major = _guillotine(hist, src_values, tgt_values, costs)
    tgt_major = _guillotine(hist.T, tgt_values, src_values, costs)
    if src_major[0] <= tgt_major[0]:
        cells = src_major[1]
    else:
        cells = [(s0, s1, t0, t1) for t0, t1, s0, s1 in tgt_major[1]]
    sizes, table = _sized_classes(hist, cells, src_values, tgt_values, costs)
    class_of_cell = np.zeros((width, width), dtype=np.int16 if len(sizes["rows"]) < 2**15 else np.int32)
    class_of_cell[np.ix_(src_values, tgt_values)] = table
    return BucketPlan(group_of=class_of_cell.ravel()[cell], src_pad_lens=tuple(sizes["src"]),
                      tgt_pad_lens=tuple(sizes["tgt"]), rows=tuple(sizes["rows"]),
                      num_batches=tuple(sizes["batches"]), num_shards=num_shards)


def _sized_classes(hist: np.ndarray, cells: list[tuple[int, int, int, int]], src_values: np.ndarray,
                   tgt_values: np.ndarray, costs: _Costs) -> tuple[dict[str, list[int]], np.ndarray]:
    """Number the non-empty classes (ordered by padded lengths), pad each to its longest member and size its
    batches; returns the per-class sizes and the class of every histogram cell."""
    table = np.zeros(hist.shape, dtype=np.int32)
    fields: dict[str, list[int]] = {"src": [], "tgt": [], "rows": [], "batches": []}
    for s0, s1, t0, t1 in sorted(cells):
        block = hist[s0:s1, t0:t1]
        count = int(block.sum())
        if count == 0:
            continue
        table[s0:s1, t0:t1] = len(fields["src"])
        src_pad = int(src_values[s0 + np.flatnonzero(block.sum(axis=1))[-1]])
        tgt_pad = int(tgt_values[t0 + np.flatnonzero(block.sum(axis=0))[-1]])
        max_rows = max_rows_for(max(src_pad, tgt_pad), costs.max_tokens, costs.rows_multiple)
        batches = _round_up(-(-count // max_rows), costs.num_shards)
        if batches > count:
            raise DataError(f"cannot split {count} sentences of padded lengths {src_pad}/{tgt_pad} into a multiple "
                            f"of num_shards={costs.num_shards} non-empty batches of <= {max_rows} rows; raise "
                            "train.max_tokens or use fewer processes")
        for key, value in zip(fields, (src_pad, tgt_pad, _round_up(-(-count // batches), costs.rows_multiple),
                                       batches), strict=True):
            fields[key].append(value)
    return fields, table
