"""The data options of a run (`[data]` in a training config), owned by the data layer.

training/config.py puts this section into the training config; `python -m data.inspect` reads
the same section from the same file, so both see the data exactly alike.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from data.masking import STRATEGIES
from data.templates import TEMPLATES
from model.errors import SFTError
from model.options import opt

DataFormat = Literal["auto", "alpaca", "sharegpt", "openai", "oasst"]
LossOn = Literal[STRATEGIES]


@dataclass
class DataConfig:
    train: str = opt("data/quickstart/alpaca_300.jsonl", "training conversations file")
    format: DataFormat = opt("auto", "file format (auto detects it from the first record)")
    eval: str = opt("", "held-out file; empty: split eval_fraction off the training file")
    eval_fraction: float = opt(0.05, "share of training conversations held out when eval is empty",
                               ge=0, lt=1)
    max_records: int = opt(0, "use only the first N conversations of the file (0: all)", ge=0)
    template: str = opt("auto", "chat template name; auto: the model's own, else alpaca")
    max_seq_len: int = opt(512, "tokens per packed row; longer conversations are truncated", ge=8)
    loss_on: LossOn = opt("train_on_assistant", "which tokens train (the masking strategy)")
    train_on_reasoning: bool = opt(True, "train the assistant's reasoning (<think>) tokens; false: "
                                   "they are context the answer is conditioned on")


def validate_data(data: DataConfig) -> None:
    """Checks that a type alone cannot express: a training file is named, the template is known."""
    if not data.train.strip():
        raise SFTError("config: 'data.train' is empty; name the training conversations file")
    if data.template != "auto" and data.template not in TEMPLATES:
        close = difflib.get_close_matches(data.template, list(TEMPLATES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SFTError(f"config: 'data.template' must be one of auto, {', '.join(TEMPLATES)}, "
                       f"got {data.template!r}{hint}")
