"""Packing: several samples per row, as if each were alone.

Padding every sample of a batch to the longest one wastes compute on pad tokens (SFT samples
vary from 20 to 2000 tokens). Packing puts several samples side by side in one row of
`max_seq_len` tokens. Done naively it is wrong in three ways, and each has a fix here:

1. Attention across samples: token 5 of sample B would attend to sample A. Each token gets a
   `seq_ids` entry (0, 1, 2, ... per sample in the row, -1 for padding); the model attends only
   to earlier tokens with the same id (a block-diagonal causal mask).
2. Positions: RoPE would see sample B at positions 300..500. `position_ids` restart at 0 at
   each sample, so every sample sees exactly the positions it would see alone.
3. The boundary prediction: with labels aligned to inputs (the loss predicts labels[t] from
   position t-1), the first token of B would be predicted from the last token of A. Its label
   is set to -100. (The first token of a lone sample is never predicted either, so this changes
   nothing relative to training on the samples one at a time.)

With the three fixes the packed loss equals the unpacked loss token for token (tested).

Which samples share a row: best-fit decreasing. Sort samples longest first; put each into the
open row whose free space is smallest but still large enough, or open a new row. It typically
leaves under a few percent of padding. Finding that row must not cost a scan of all rows (a
million samples make ~10^5 rows): rows are grouped by their free space, a sorted list holds the
distinct free spaces (at most max_seq_len of them, whatever the number of samples) and a heap per
space holds its rows, lowest index first. One sample costs a bisection and a heap operation, so
packing is O(n log n) and its memory is a few integers per sample.

At scale the rows are built from flat token arrays (data/pipeline.py, data/cache.py) rather than
lists: `place` says where each sample goes (row, first column, number within the row) and
`packed_rows` copies the samples there with numpy, block by block, so the rows cost their own
(N, T) arrays and nothing per token in Python. Those arrays are compact (int32 tokens and labels,
int16 or int32 positions and sample numbers); a micro-batch is widened to int64 as it is
selected (training/step.py `to_device`). `pack` (lists in, lists out) runs the same functions.

Shapes: a row is 4 lists of length max_seq_len; `collate(rows)` stacks them into (B, T) LongTensors.
"""
from __future__ import annotations

import bisect
import heapq
from typing import NamedTuple, Sequence

import numpy as np
import torch

from model.errors import SFTError
from model.loss import IGNORE_INDEX

PAD_SEQ_ID = -1


class Placement(NamedTuple):
    """Where each sample goes: row, first column and number within the row, (n,) arrays each."""
    row: np.ndarray
    col: np.ndarray
    seq: np.ndarray
    n_rows: int


def place(lengths: Sequence[int], capacity: int) -> Placement:
    """Best-fit decreasing: each sample, longest first (ties: lowest index), goes to the row with
    the least free space that still holds it (the lowest-numbered such row), else to a new row."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        i = int(lengths.argmax())
        raise SFTError(f"sample {i} has {lengths[i]} tokens, more than max_seq_len={capacity}; "
                       "truncate it first (tokenize with max_len=max_seq_len)")
    order = np.lexsort((np.arange(len(lengths)), -lengths)).tolist()
    sizes = lengths.tolist()
    row, col, seq = [0] * len(sizes), [0] * len(sizes), [0] * len(sizes)
    members: list[int] = []              # samples per row so far
    spaces: list[int] = []               # sorted distinct free spaces of the rows (<= capacity + 1 values)
    holders: dict[int, list[int]] = {}   # free space -> heap of the rows that have exactly that space
    bisect_left, insort, heappop, heappush = bisect.bisect_left, bisect.insort, heapq.heappop, heapq.heappush
    for i in order:
        n = sizes[i]
        k = bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            heap = holders[space]
            r = heappop(heap)
            if not heap:
                del spaces[k], holders[space]
        else:
            space, r = capacity, len(members)
            members.append(0)
        row[i], col[i], seq[i] = r, capacity - space, members[r]
        members[r] += 1
        space -= n
        if space in holders:
            heappush(holders[space], r)
        else:
            insort(spaces, space)
            holders[space] = [r]
    return Placement(np.array(row, np.int64), np.array(col, np.int64), np.array(seq, np.int64), len(members))


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of total length <= capacity (see `place`), each row's
    samples in the order they were placed."""
    where = place(lengths, capacity)
    bins: list[list[int]] = [[] for _ in range(where.n_rows)]
    for i in np.lexsort((where.seq, where.row)).tolist():
        bins[where.row[i]].append(i)
    return bins


def empty_rows(n_rows: int, capacity: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """(n_rows, capacity) arrays of padding, in the compact dtypes (see the module docstring)."""
    small = np.int16 if capacity <= np.iinfo(np.int16).max else np.int32
    shape = (n_rows, capacity)
    return {"input_ids": np.full(shape, pad_id, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
            "position_ids": np.zeros(shape, small), "seq_ids": np.full(shape, PAD_SEQ_ID, small)}


class Samples(NamedTuple):
    """Samples stored end to end: sample i is tokens[starts[i]:starts[i] + lengths[i]], and
    trained[...] says which of its tokens train."""
    tokens: np.ndarray
    trained: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def packed_rows(parts: list[Samples], capacity: int, pad_id: int = 0, block: int = 4096) -> dict[str, np.ndarray]:
    """The samples of every part packed into (N, capacity) rows (best-fit decreasing).

    A row's samples sit side by side from column 0 and its padding at the end, so in row-major
    order the real positions of a block of rows are one boolean mask, and its tokens are the
    samples' slices concatenated in (row, column) order: a few array operations per block.
    """
    lengths = np.concatenate([p.lengths for p in parts] or [np.zeros(0, np.int64)]).astype(np.int64)
    part = np.repeat(np.arange(len(parts)), [len(p.lengths) for p in parts]).tolist()
    starts = np.concatenate([p.starts for p in parts] or [np.zeros(0, np.int64)]).astype(np.int64)
    where = place(lengths, capacity)
    rows = empty_rows(where.n_rows, capacity, pad_id)
    order = np.lexsort((where.col, where.row))  # row by row, left to right
    filled = np.bincount(where.row, weights=lengths, minlength=where.n_rows).astype(np.int64)
    bounds = np.searchsorted(where.row[order], np.arange(0, where.n_rows + block, block))
    for r0, lo, hi in zip(range(0, where.n_rows, block), bounds[:-1], bounds[1:]):
        sel = order[lo:hi]
        n, first = lengths[sel], starts[sel].tolist()
        pieces = [(parts[part[i]], a, a + k) for i, a, k in zip(sel.tolist(), first, n.tolist())]
        ids = np.concatenate([p.tokens[a:b] for p, a, b in pieces])
        labels = np.where(np.concatenate([p.trained[a:b] for p, a, b in pieces]), ids, IGNORE_INDEX)
        begin = np.cumsum(n) - n                                  # where each sample starts in `ids`
        labels[begin] = IGNORE_INDEX                              # a sample's first token: never predicted
        r1 = r0 + len(filled[r0:r0 + block])
        real = np.arange(capacity) < filled[r0:r1, None]         # (block, T) where the tokens go
        rows["input_ids"][r0:r1][real] = ids
        rows["labels"][r0:r1][real] = labels
        rows["position_ids"][r0:r1][real] = np.arange(len(ids), dtype=np.int32) - np.repeat(begin.astype(np.int32), n)
        rows["seq_ids"][r0:r1][real] = np.repeat(where.seq[sel], n)
    return rows


def _empty_row() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": [], "seq_ids": []}


def _append(row: dict, sample: dict, seq_id: int, mask_first: bool) -> None:
    ids, labels = sample["input_ids"], list(sample["labels"])
    if mask_first and labels:
        labels[0] = IGNORE_INDEX  # not predicted from the previous sample's last token
    row["input_ids"] += ids
    row["labels"] += labels
    row["position_ids"] += range(len(ids))
    row["seq_ids"] += [seq_id] * len(ids)


def _pad(row: dict, length: int, pad_id: int) -> dict:
    n = length - len(row["input_ids"])
    row["input_ids"] += [pad_id] * n
    row["labels"] += [IGNORE_INDEX] * n
    row["position_ids"] += [0] * n
    row["seq_ids"] += [PAD_SEQ_ID] * n
    return row


def pack(samples: list[dict], max_seq_len: int, pad_id: int = 0) -> list[dict]:
    """Rows of `max_seq_len` tokens holding whole samples: input_ids, labels, position_ids, seq_ids."""
    lengths = np.array([len(s["input_ids"]) for s in samples], np.int64)
    tokens = np.array([i for s in samples for i in s["input_ids"]], np.int64)
    trained = np.array([l != IGNORE_INDEX for s in samples for l in s["labels"]], bool)
    rows = packed_rows([Samples(tokens, trained, np.cumsum(lengths) - lengths, lengths)], max_seq_len, pad_id)
    return [{k: rows[k][r].tolist() for k in rows} for r in range(len(rows["input_ids"]))]


def pad_rows(samples: list[dict], pad_id: int = 0, length: int | None = None) -> list[dict]:
    """One sample per row, padded to `length` (default: the longest) -- the unpacked baseline."""
    length = length or max(len(s["input_ids"]) for s in samples)
    rows = []
    for s in samples:
        row = _empty_row()
        _append(row, s, 0, mask_first=False)
        rows.append(_pad(row, length, pad_id))
    return rows


def collate(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack rows into (B, T) LongTensors, padding shorter rows to the longest."""
    length = max(len(r["input_ids"]) for r in rows)
    rows = [_pad({k: list(r[k]) for k in ("input_ids", "labels", "position_ids", "seq_ids")}, length, pad_id)
            for r in rows]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long)  # (B, T)
            for k in ("input_ids", "labels", "position_ids", "seq_ids")}


def real_fraction(rows: list[dict]) -> float:
    """Share of row positions that hold a sample token rather than padding."""
    total = sum(len(r["seq_ids"]) for r in rows)
    return sum(s != PAD_SEQ_ID for r in rows for s in r["seq_ids"]) / max(total, 1)
