"""The data options of a run (`[data]` in a training config), owned by the data layer.

training/config.py puts this section into the training config; `python -m data.inspect` reads
the same section from the same file, so both see the data exactly alike.

One file or a mixture. `data.train` (with `data.format`, `data.eval`, `data.max_records`) names
one file; `[[data.sources]]` tables name several, each with its own path, format, weight,
record limit, system prompt, template and held-out share or file:

    [[data.sources]]
    path = "chat.jsonl"
    weight = 3.0                 # or no weights and data.temperature (see data/mixing.py)
    [[data.sources]]
    path = "gsm8k.json"
    weight = 1.0
    system = "Solve the problem step by step."

A source's weight is left unset by default (0.0 stands for "unset"): then the mixture follows
the sources' sizes, flattened by `data.temperature` when it is > 0. Giving weights to some
sources and not to others is an error, as is a temperature together with weights.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Literal

from data.masking import STRATEGIES
from data.templates import TEMPLATES
from model.errors import SFTError
from model.options import opt

DataFormat = Literal["auto", "alpaca", "sharegpt", "openai", "oasst"]
LossOn = Literal[STRATEGIES]
CacheHash = Literal["quick", "full"]


@dataclass
class SourceConfig:
    """One `[[data.sources]]` table."""
    path: str = opt("", "conversations file (JSON list or JSONL)")
    name: str = opt("", "name in the report and the cache (empty: the file name without extension)")
    format: DataFormat = opt("auto", "file format (auto detects it from the first record)")
    weight: float = opt(0.0, "share of the mixture relative to the other sources' weights (0.0: unset, "
                        "the sizes and data.temperature decide)", gt=0)
    max_records: int = opt(0, "use only the first N conversations of the file (0: all)", ge=0)
    system: str = opt("", "system prompt given to the conversations that have none")
    template: str = opt("", "chat template for this source (empty: data.template)")
    eval: str = opt("", "held-out file of this source; empty: split eval_fraction off the file")
    eval_fraction: float = opt(-1.0, "share of this source's conversations held out (-1.0: "
                               "data.eval_fraction)", ge=0, lt=1)


@dataclass
class DataConfig:
    train: str = opt("data/quickstart/alpaca_300.jsonl", "training conversations file")
    format: DataFormat = opt("auto", "file format (auto detects it from the first record)")
    eval: str = opt("", "held-out file; empty: split eval_fraction off the training file")
    eval_fraction: float = opt(0.05, "share of training conversations held out when eval is empty",
                               ge=0, lt=1)
    max_records: int = opt(0, "use only the first N conversations of the file (0: all)", ge=0)
    sources: list[SourceConfig] = opt([], "[[data.sources]] tables: several files mixed into one "
                                      "training set (empty: data.train is the one source)")
    temperature: float = opt(0.0, "mix sources by size^(1/T) instead of by weights (0: weights, "
                             "or sizes when no source has one)", ge=0)
    template: str = opt("auto", "chat template name; auto: the model's own, else alpaca")
    max_seq_len: int = opt(512, "tokens per packed row; longer conversations are truncated", ge=8)
    loss_on: LossOn = opt("train_on_assistant", "which tokens train (the masking strategy)")
    train_on_reasoning: bool = opt(True, "train the assistant's reasoning (<think>) tokens; false: "
                                   "they are context the answer is conditioned on")
    num_workers: int = opt(0, "processes that tokenize (0: one per CPU core)", ge=0)
    cache_dir: str = opt("", "tokenized cache folder (empty: <run.out_dir>/.cache/data)")
    cache_hash: CacheHash = opt("quick", "how a data file is recognised in the cache: quick = size, "
                                "modification time and the first and last MiB; full = every byte")


# the one-file keys: with [[data.sources]] each source says these itself
ONE_FILE_KEYS = ("train", "format", "eval", "max_records")


def _check_template(name: str, key: str) -> None:
    if name != "auto" and name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SFTError(f"config: '{key}' must be one of auto, {', '.join(TEMPLATES)}, got {name!r}{hint}")


def validate_data(data: DataConfig) -> None:
    """Checks that a type alone cannot express: known template names, a training file, and a
    mixture whose sources say what they are and how much of each is wanted."""
    _check_template(data.template, "data.template")
    if not data.sources:
        if not data.train.strip():
            raise SFTError("config: 'data.train' is empty; name the training conversations file "
                           "(or give [[data.sources]] tables)")
        return
    defaults = {f.name: f.default for f in fields(DataConfig) if f.name in ONE_FILE_KEYS}
    for k in ONE_FILE_KEYS:
        if getattr(data, k) != defaults[k]:
            raise SFTError(f"config: 'data.{k}' names one file; with [[data.sources]] set it in each "
                           f"source instead (or drop the [[data.sources]] tables)")
    weighted = [i for i, s in enumerate(data.sources) if s.weight > 0]
    for i, s in enumerate(data.sources):
        where = f"config: 'data.sources[{i}]'"
        if not s.path:
            raise SFTError(f"{where} has no path; each [[data.sources]] table needs path = \"FILE\"")
        if s.template:
            _check_template(s.template, f"data.sources[{i}].template")
        if weighted and s.weight <= 0:
            raise SFTError(f"{where} ({s.path}) has no weight but data.sources[{weighted[0]}] has one; "
                           "give every source a weight, or none (sizes and data.temperature decide)")
    if weighted and data.temperature > 0:
        raise SFTError("config: 'data.temperature' mixes by size; it cannot be used with source weights "
                       f"(data.sources[{weighted[0]}].weight); drop one of them")
