"""The training data of a run: sources -> tokenized arrays (cached) -> held-out split -> mixture -> rows.

    [[data.sources]] or data.train --resolve_sources--> sources (data/sources.py)
        --load_or_build--> each file's samples as flat token arrays, memory-mapped from the cache
                           (data/cache.py; built by data/pipeline.py in data.num_workers processes)
        --held_out_conversations--> each source's held-out samples (seeded; or its eval file)
        --mixture_take--> which training samples of each source, how often (data/mixing.py)
        --place + fill_rows--> (N, T) arrays: input_ids, labels, position_ids, seq_ids (data/packing.py)

Under torchrun rank 0 reads the cache or builds it while the other ranks wait at a barrier;
then every rank maps the same files, so all of them hold the same rows without tokenizing.

Rows are packed once (best-fit decreasing) into compact arrays (int32 tokens and labels), so a
micro-batch is an index_select, not a Python list copy; each epoch shuffles whole rows
(training/distributed.py `step_rows`). The run's `data_report.json` (written by training/loop.py
into the run folder) says per source: conversations, dropped samples and why, tokens, trainable
tokens, and what the mixture took (samples, passes, tokens, share of the mixture's tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.cache import load_or_build, tokenizer_fingerprint
from data.chat import Chat
from data.mixing import format_report, mixture_take
from data.packing import Samples, packed_rows
from data.pipeline import Masking, Tokenized, Workers, cpu_cores
from data.sources import DataFile, HeldOutConversations, Source, held_out_conversations, resolve_sources
from model.errors import SFTError
from training import distributed as D
from training.config import Config

Rows = dict[str, torch.Tensor]  # (N, T) input_ids, labels, position_ids, seq_ids


@dataclass
class TrainData:
    train: Rows                     # packed training rows
    held_out: Rows | None           # packed held-out rows (None: nothing held out)
    held_out_conversations: HeldOutConversations  # read on demand, for sample answers after training
    report: dict                    # written to <run>/data_report.json

    @property
    def n_train(self) -> int:
        return len(self.train["input_ids"])

    @property
    def n_held_out(self) -> int:
        return 0 if self.held_out is None else len(self.held_out["input_ids"])


Part = tuple[Tokenized, np.ndarray]  # a file's arrays and the sample numbers taken from it (repeats allowed)


def pack_parts(parts: list[Part], max_len: int) -> Rows | None:
    """Rows of max_len tokens holding the samples of every part (best-fit decreasing)."""
    if not sum(len(idx) for _, idx in parts):
        return None
    rows = packed_rows([Samples(tok.input_ids, tok.trained, tok.offsets[idx], tok.lengths[idx]) for tok, idx in parts],
                       max_len)
    return {k: torch.from_numpy(v) for k, v in rows.items()}


def _usage(tok: Tokenized, idx: np.ndarray) -> dict:
    return {"samples": len(idx), "tokens": int(tok.lengths[idx].sum()),
            "trainable_tokens": int(tok.trainable[idx].sum())}


def _tokenize_all(cfg: Config, chat: Chat, sources: list[Source]) -> dict[DataFile, tuple[Tokenized, str]]:
    """Every file's arrays: rank 0 reads or builds the cache, the other ranks wait, then map it."""
    masking = Masking(cfg.data.loss_on, cfg.data.max_seq_len, cfg.data.train_on_reasoning)
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.run.out_dir) / ".cache" / "data")
    tokenizer = tokenizer_fingerprint(cfg.model.path)
    files = [(f, s.name if f is s.train else f"{s.name}-eval") for s in sources for f in (s.train, s.eval) if f]
    log = tqdm.write if D.rank() == 0 else (lambda *a: None)
    out = {}
    with Workers(chat.tokenizer, cfg.data.num_workers or cpu_cores()) as workers:
        for turn in (0, 1):  # rank 0 first; the others once it is done (a cache they can all see)
            if (D.rank() == 0) == (turn == 0):
                for f, name in files:
                    e = load_or_build(f, name, masking, tokenizer, cache_dir, workers,
                                      cfg.data.cache_hash == "full", log)
                    out[f] = (e.tokenized, e.status)
            if turn == 0:
                D.barrier()
    return out


def _check_kept(file: DataFile, tok: Tokenized, held_out: bool = False) -> None:
    """A training file must hold conversations; any file that has some must keep a sample."""
    st = tok.stats
    if st["conversations"] == 0 and not held_out:
        raise SFTError(f"{file.path}: no conversations in the file (empty?)")
    if st["conversations"] and st["samples"] == 0:
        reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in st["dropped"].items() if n)
        name = f"{file.label} ({file.path})" if file.label else str(file.path)
        raise SFTError(f"{name}: every one of its {st['conversations']} conversation(s) was dropped ({reasons}): "
                       "no conversation kept a trainable token (check data.template, data.loss_on and "
                       "data.max_seq_len)")


@dataclass
class Split:
    """One source after holding out: which of its samples train, which are held out."""
    train: Part
    held_out: Part
    held_out_file: tuple[DataFile, list[int] | None]  # for HeldOutConversations
    held_out_conversations: int
    report: dict


def split_source(s: Source, tokenized: dict, seed: int) -> Split:
    """A source's held-out samples: all of its eval file, or those of a seeded share of its conversations."""
    tok, status = tokenized[s.train]
    _check_kept(s.train, tok)
    report = {"path": str(s.train.path), "cache": status, **tok.stats}
    if s.eval is not None:
        held_tok, held_status = tokenized[s.eval]
        _check_kept(s.eval, held_tok, held_out=True)
        report["held_out"] = {"path": str(s.eval.path), "cache": held_status, **held_tok.stats}
        held_idx, n_held = np.arange(held_tok.n_samples), held_tok.stats["conversations"]
        split = Split((tok, np.arange(tok.n_samples)), (held_tok, held_idx), (s.eval, None), n_held, report)
    else:
        n = tok.stats["conversations"]
        numbers = held_out_conversations(n, s.eval_fraction, seed)
        if len(numbers) == n:
            key = "data.eval_fraction" if s.key == "data.train" else f"{s.key}.eval_fraction"
            raise SFTError(f"{s.train.path}: all {n} conversation(s) are held out; add data or lower {key}")
        held = np.isin(tok.conversation, numbers)
        report["held_out"] = {"conversations": len(numbers)}
        split = Split((tok, np.flatnonzero(~held)), (tok, np.flatnonzero(held)), (s.train, numbers), len(numbers),
                      report)
    report["held_out"].update(_usage(*split.held_out))
    report["train"] = _usage(*split.train)
    return split


def mix_sources(sources: list[Source], splits: list[Split], temperature: float, seed: int) -> list[Part]:
    """The training samples each source contributes (data/mixing.py), recorded in its report."""
    weights = {s.name: s.weight for s in sources} if any(s.weight > 0 for s in sources) else None
    sizes = {s.name: len(sp.train[1]) for s, sp in zip(sources, splits)}
    taken, probs = mixture_take(sizes, weights, temperature or None, seed=seed)
    chosen = []
    for s, sp in zip(sources, splits):
        tok, idx = sp.train[0], sp.train[1][np.asarray(taken[s.name], np.int64)]
        sp.report["mixture"] = {"probability": probs[s.name], **_usage(tok, idx), "passes": len(idx) / max(sizes[s.name], 1)}
        chosen.append((tok, idx))
    total = sum(sp.report["mixture"]["tokens"] for sp in splits)
    for sp in splits:
        sp.report["mixture"]["token_share"] = sp.report["mixture"]["tokens"] / max(total, 1)
    return chosen


def prepare_data(cfg: Config, chat: Chat) -> TrainData:
    """Read (or map from the cache), hold out, mix and pack the run's data (see the module docstring)."""
    sources = resolve_sources(cfg.data, chat.template)
    tokenized = _tokenize_all(cfg, chat, sources)
    splits = [split_source(s, tokenized, cfg.run.seed) for s in sources]
    chosen = mix_sources(sources, splits, cfg.data.temperature, cfg.run.seed)
    max_len = cfg.data.max_seq_len
    train = pack_parts(chosen, max_len)
    held = pack_parts([sp.held_out for sp in splits if len(sp.held_out[1])], max_len)
    if held is not None and cfg.eval.max_rows:
        held = {k: v[:cfg.eval.max_rows] for k, v in held.items()}
    report = {s.name: sp.report for s, sp in zip(sources, splits)}
    summary = _summary(report, train, held, max_len)
    if D.rank() == 0:
        _print_report(report, summary)
    conversations = HeldOutConversations([sp.held_out_file for sp in splits],
                                         [sp.held_out_conversations for sp in splits])
    return TrainData(train, held, conversations, {"sources": report, **summary})


def _summary(report: dict, train: Rows, held: Rows | None, max_len: int) -> dict:
    """The totals, which the per-source numbers add up to (and the rows hold: tests/test_sources.py)."""
    mixture = {k: sum(r["mixture"][k] for r in report.values()) for k in ("samples", "tokens", "trainable_tokens")}
    held_tokens = sum(r["held_out"]["tokens"] for r in report.values())
    rows = {"train": len(train["input_ids"]), "held_out": 0 if held is None else len(held["input_ids"])}
    return {"max_seq_len": max_len, "mixture": mixture, "rows": rows,
            "real_fraction": mixture["tokens"] / max(rows["train"] * max_len, 1), "held_out_tokens": held_tokens}


def _print_report(report: dict, summary: dict) -> None:
    for name, r in report.items():
        dropped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in r["dropped"].items() if n) or "none"
        tqdm.write(f"{name} ({r['path']}, cache {r['cache']}): {r['conversations']} conversations, {r['samples']} "
                   f"samples ({r['truncated']} truncated), dropped: {dropped}; {r['tokens']} tokens, "
                   f"{r['trainable_tokens']} trainable; held out {r['held_out']['samples']} samples")
    table = {n: {"available": r["train"]["samples"], "probability": r["mixture"]["probability"],
                 "samples": r["mixture"]["samples"], "passes": r["mixture"]["passes"],
                 "tokens": r["mixture"]["tokens"], "trainable_tokens": r["mixture"]["trainable_tokens"]}
             for n, r in report.items()}
    tqdm.write(format_report(table) + f"\n{summary['rows']['train']} rows x {summary['max_seq_len']} tokens "
               f"({summary['real_fraction']:.1%} real tokens), {summary['rows']['held_out']} held-out rows")
