"""The training data of a run: file -> conversations -> held-out split -> packed rows.

    data.train file --load_conversations--> conversations (data/formats.py)
        --split_held_out--> train / held-out conversations (seeded; or the data.eval file)
        --tokenize_dataset--> samples: input_ids + labels (-100 outside assistant replies)
        --pack + collate--> (N, T) tensors: input_ids, labels, position_ids, seq_ids

Rows are packed once (best-fit decreasing, data/packing.py) and collated once into (N, T)
LongTensors, so a micro-batch is an index_select, not a Python list copy; each epoch shuffles
whole rows (training/distributed.py `step_rows`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data.chat import Chat
from data.formats import load_conversations
from data.masking import tokenize_dataset
from data.packing import collate, pack
from model.errors import SFTError
from training import distributed as D
from training.config import Config

Rows = dict[str, torch.Tensor]  # (N, T) input_ids, labels, position_ids, seq_ids


@dataclass
class TrainData:
    train: Rows                     # packed training rows
    held_out: Rows | None           # packed held-out rows (None: nothing held out)
    held_out_conversations: list    # for sample answers after training

    @property
    def n_train(self) -> int:
        return len(self.train["input_ids"])

    @property
    def n_held_out(self) -> int:
        return 0 if self.held_out is None else len(self.held_out["input_ids"])


def split_held_out(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of conversations held out (at least 1 when fraction > 0)."""
    if fraction <= 0:
        return convs, []
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(convs) * fraction))
    held = set(idx[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [convs[i] for i in sorted(held)]


def tokenize_all(chat: Chat, convs: list, cfg: Config, where: str) -> list[dict]:
    """Template + tokenize + mask; prints what was dropped and why (data/masking.py)."""
    samples, report = tokenize_dataset(chat.tokenizer, chat.template, convs, cfg.data.max_seq_len,
                                       cfg.data.loss_on, source=where,
                                       train_on_reasoning=cfg.data.train_on_reasoning)
    if convs and not samples:
        raise SFTError(f"{where}: no conversation kept a trainable token (check data.template, "
                       f"data.loss_on and data.max_seq_len)")
    if D.rank() == 0:
        tqdm.write(f"{where}: {report.summary()}")
    return samples


def prepare_data(cfg: Config, chat: Chat) -> TrainData:
    """Read, split, tokenize and pack the run's data (see the module docstring)."""
    convs = load_conversations(cfg.data.train, format=cfg.data.format)
    if not convs:
        raise SFTError(f"{cfg.data.train}: no conversations in the file (empty?)")
    if cfg.data.max_records:
        convs = convs[:cfg.data.max_records]
    if cfg.data.eval:
        train_convs, eval_convs = convs, load_conversations(cfg.data.eval, format=cfg.data.format)
    else:
        train_convs, eval_convs = split_held_out(convs, cfg.data.eval_fraction, cfg.run.seed)
    if not train_convs:
        raise SFTError(f"{cfg.data.train}: all {len(convs)} conversation(s) are held out; add data "
                       "or lower data.eval_fraction")
    max_len = cfg.data.max_seq_len
    train = tokenize_all(chat, train_convs, cfg, cfg.data.train)
    held = tokenize_all(chat, eval_convs, cfg, cfg.data.eval or "held-out")
    held_rows = collate(pack(held, max_len)) if held else None
    if held_rows is not None and cfg.eval.max_rows:
        held_rows = {k: v[:cfg.eval.max_rows] for k, v in held_rows.items()}
    return TrainData(collate(pack(train, max_len)), held_rows, eval_convs)
