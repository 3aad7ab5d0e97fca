"""From a data file to flat token arrays, in several processes, with the output of one.

    file --open_records--> records (streamed) --chunks of CHUNK records--> worker processes:
        record -> conversations (data/formats.py) -> system prompt -> template + tokenize + mask
        (data/masking.py tokenize_dataset) -> numpy arrays of the chunk
    --results in chunk order--> one `Tokenized`: every sample's tokens end to end

Tokenizing is pure CPU work on independent conversations, so it splits over processes (threads
would share one interpreter lock). What keeps the output identical to one process, id for id:
chunks are cut by record count, never by timing; the results are collected in submission order;
the worker code is the code this process runs when `num_workers` is 1. At most two chunks per
worker are in flight, so a million-line file streams through in bounded memory (multiprocessing's
own `imap` would read the whole file into its task queue first).

Workers are forked where the OS allows it (they inherit the tokenizer for free); elsewhere they
are spawned and receive a pickled copy. Forking is also avoided once CUDA is initialised.

`Tokenized`, the result (also what data/cache.py stores and memory-maps):
    input_ids     (n_tokens,) int32     every kept sample's tokens, end to end
    trained       (n_tokens,) bool      whether the token trains (its label is itself, else -100)
    offsets       (n_samples + 1,) int64  sample i is input_ids[offsets[i]:offsets[i+1]]
    conversation  (n_samples,) int32    which conversation of the file each sample came from
    trainable     (n_samples,) int32    tokens that train in each sample (its first not counted)
    stats         counts: conversations, samples, truncated, dropped by reason, tokens, trainable
"""
from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from data.conversation import Conversation
from data.formats import open_records, record_conversations, iter_conversations
from data.masking import Strategy, tokenize_dataset
from data.sources import DataFile, with_system
from model.errors import SFTError
from model.loss import IGNORE_INDEX

CHUNK = 256  # records per task: large enough to hide the inter-process cost, small enough to stream
DROP_REASONS = ("no_trainable_token", "token_boundary")


@dataclass(frozen=True)
class Masking:
    """How conversations become samples (the run's [data] options that change the tokens)."""
    loss_on: Strategy
    max_seq_len: int
    train_on_reasoning: bool


@dataclass
class Tokenized:
    input_ids: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    conversation: np.ndarray
    trainable: np.ndarray   # (n_samples,) int32: tokens that train in each sample, its first not counted
    stats: dict = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_samples(self) -> int:
        return len(self.conversation)


def trainable_counts(trained: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n_samples,) tokens that train in each sample, its first token not counted (nothing
    predicts it: in a packed row its label is -100, data/packing.py)."""
    if len(offsets) < 2:
        return np.zeros(0, np.int32)
    starts = offsets[:-1]
    return (np.add.reduceat(trained, starts, dtype=np.int64) - trained[starts]).astype(np.int32)


# ----------------------------------------------------------------------------- one chunk (in a worker)

_TOKENIZER = None  # set in each worker process (and in this process while num_workers <= 1)


def _set_tokenizer(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


@dataclass
class Chunk:
    """What a worker returns for one chunk of records."""
    n_conversations: int
    input_ids: np.ndarray   # (t,) int32
    trained: np.ndarray     # (t,) bool
    lengths: np.ndarray     # (s,) int64
    conversation: np.ndarray  # (s,) int32, numbered within the chunk
    counts: np.ndarray      # (n_conversations, 4) int64: samples rendered, truncated, dropped x 2 reasons


def tokenize_chunk(task: tuple) -> Chunk:
    """Records (or conversations already built) -> the chunk's samples and counts."""
    items, file, fmt, detected, masking = task
    ids: list[int] = []
    labels: list[int] = []
    lengths, conv_of, counts = [], [], []
    for where, item in items:
        convs = [item] if isinstance(item, Conversation) else record_conversations(item, where, fmt, detected=detected)
        for conv in convs:
            samples, rep = tokenize_dataset(_TOKENIZER, file.template, [with_system(conv, file.system)],
                                            masking.max_seq_len, masking.loss_on, source=where,
                                            train_on_reasoning=masking.train_on_reasoning)
            for s in samples:
                ids += s["input_ids"]
                labels += s["labels"]
                lengths.append(len(s["input_ids"]))
                conv_of.append(len(counts))
            counts.append((rep.samples, rep.truncated, len(rep.dropped_no_trainable), len(rep.dropped_boundary)))
    return Chunk(len(counts), np.array(ids, np.int32), np.array(labels, np.int64) != IGNORE_INDEX,
                 np.array(lengths, np.int64), np.array(conv_of, np.int32), np.array(counts, np.int64).reshape(-1, 4))


# ----------------------------------------------------------------------------- the workers


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """`num_workers` processes holding the tokenizer (started at the first map), or this process
    when num_workers <= 1. Use as a context manager."""

    def __init__(self, tokenizer, num_workers: int):
        self.tokenizer, self.n = tokenizer, num_workers
        self.pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def _start(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        ctx = multiprocessing.get_context("fork" if "fork" in methods and not cuda else "spawn")
        gc.freeze()  # a forked child's garbage collector would otherwise write to (so copy) every page it scans
        try:
            self.pool = ctx.Pool(self.n, initializer=_set_tokenizer, initargs=(self.tokenizer,))
        finally:
            gc.unfreeze()

    def map(self, fn: Callable, tasks: Iterable) -> Iterator:
        """fn(task) for each task, in order; at most two tasks per worker in flight. A single task
        runs here (starting processes for it would cost more than it saves)."""
        tasks = iter(tasks)
        head = list(itertools.islice(tasks, 2))
        tasks = itertools.chain(head, tasks)
        if self.n <= 1 or len(head) < 2:
            before = _TOKENIZER
            _set_tokenizer(self.tokenizer)
            try:
                yield from map(fn, tasks)
            finally:
                _set_tokenizer(before)
            return
        if self.pool is None:
            self._start()
        pending: deque = deque()
        for task in itertools.chain(tasks, [None]):
            if task is not None:
                pending.append(self.pool.apply_async(fn, (task,)))
            while pending and (task is None or len(pending) >= 2 * self.n):
                yield pending.popleft().get()


# ----------------------------------------------------------------------------- one file


def _items(file: DataFile):
    """(format, detected, iterator of (where, record or Conversation)), or None for an empty file."""
    records = open_records(file.path, file.format)
    if records is None:
        return None
    if records.whole_file:  # flat OASST: this process links the messages, workers tokenize
        return records.format, False, iter_conversations(file.path, records.format)
    items = records.items
    if file.max_records and records.format != "oasst":  # one conversation per record
        items = itertools.islice(items, file.max_records)
    return records.format, records.detected, items


def tokenize_file(file: DataFile, masking: Masking, workers: Workers, progress: bool = True,
                  chunk_records: int = CHUNK) -> Tokenized:
    """Every sample of a data file, tokenized and masked (see the module docstring)."""
    opened = _items(file)
    parts: list[Chunk] = []
    if opened is not None:
        fmt, detected, items = opened
        tasks = ((chunk, file, fmt, detected, masking) for chunk in _batched(items, chunk_records))
        limit = file.max_records or None
        bar = tqdm(desc=f"tokenizing {file.path.name}", unit=" conv", disable=not progress, leave=False,
                   mininterval=2.0)
        try:
            done = 0
            for chunk in workers.map(tokenize_chunk, tasks):
                parts.append(chunk)
                done += chunk.n_conversations
                bar.update(chunk.n_conversations)
                if limit is not None and done >= limit:
                    break
        except SFTError as e:
            raise SFTError(f"{file.label}: {e}" if file.label else str(e)) from None
        finally:
            bar.close()
    return _join(parts, file.max_records or None)


def _batched(items: Iterator, n: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, n)):
        yield chunk


def _join(parts: list[Chunk], limit: int | None) -> Tokenized:
    """The chunks end to end, conversations renumbered, cut after the first `limit` conversations."""
    bases = np.cumsum([0] + [c.n_conversations for c in parts])
    conv = np.concatenate([c.conversation.astype(np.int64) + b for c, b in zip(parts, bases)] or [np.zeros(0, np.int64)])
    lengths = np.concatenate([c.lengths for c in parts] or [np.zeros(0, np.int64)])
    counts = np.concatenate([c.counts for c in parts] or [np.zeros((0, 4), np.int64)])
    ids = np.concatenate([c.input_ids for c in parts] or [np.zeros(0, np.int32)])
    trained = np.concatenate([c.trained for c in parts] or [np.zeros(0, bool)])
    if limit is not None and len(counts) > limit:
        keep = int(np.searchsorted(conv, limit))  # conversation numbers are non-decreasing
        n_tok = int(lengths[:keep].sum())
        conv, lengths, counts, ids, trained = conv[:keep], lengths[:keep], counts[:limit], ids[:n_tok], trained[:n_tok]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    trainable = trainable_counts(trained, offsets)
    stats = {"conversations": len(counts), "samples": len(lengths), "truncated": int(counts[:, 1].sum()),
             "dropped": {r: int(counts[:, 2 + k].sum()) for k, r in enumerate(DROP_REASONS)},
             "tokens": int(lengths.sum()), "trainable_tokens": int(trainable.sum())}
    return Tokenized(ids, trained, offsets, conv.astype(np.int32), trainable, stats)
