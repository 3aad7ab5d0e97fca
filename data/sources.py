"""The sources of a run: which files, read how, and which of their conversations are held out.

A run trains on one or several sources (`[[data.sources]]`, or the one file `data.train`; see
data/config.py). `resolve_sources` turns the options into `Source` records, checking what can be
checked before any reading starts: every file exists, names are unique. Each source is then
tokenized (data/pipeline.py, through the cache of data/cache.py), held out, mixed (data/mixing.py)
and packed (data/packing.py) by training/data.py.

Held-out conversations. A source either has a held-out file of its own (`eval`), or a seeded
random `eval_fraction` of its conversations is held out (at least one when the fraction is > 0).
The split is over conversation numbers, so it is decided after tokenizing, from the cached
arrays, and a different fraction or seed never re-tokenizes. The held-out conversations' text is
needed only for sample answers after training: `HeldOutConversations` reads it back from the
files when asked, so a run started from the cache never parses its data files at all.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data.config import DataConfig
from data.conversation import Conversation
from data.formats import iter_conversations
from model.errors import SFTError


@dataclass(frozen=True)
class DataFile:
    """One file to tokenize, and everything about reading it that changes its tokens."""
    path: Path
    format: str          # auto | alpaca | sharegpt | openai | oasst
    max_records: int     # the first N conversations (0: all)
    system: str          # system prompt for the conversations that have none ("": none)
    template: str        # chat template name
    label: str           # how errors name it: "data.sources[2] 'math'" ("" for data.train)


@dataclass(frozen=True)
class Source:
    name: str
    key: str                     # the config key: data.sources[2] or data.train
    train: DataFile
    eval: DataFile | None        # a held-out file of its own, or None: eval_fraction of train
    eval_fraction: float
    weight: float                # 0.0: unset


def _stem_names(paths: list[str]) -> list[str]:
    return [Path(p).stem or f"source{i}" for i, p in enumerate(paths)]


def _existing(path: str, key: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SFTError(f"config: '{key}': {path} not found")
    if not p.is_file():
        raise SFTError(f"config: '{key}': {path} is not a file")
    return p


def resolve_sources(data: DataConfig, template: str) -> list[Source]:
    """The run's sources; `template` is the run's resolved chat template (a source may override it)."""
    if not data.sources:  # the one file data.train, exactly as before mixtures existed
        train = DataFile(_existing(data.train, "data.train"), data.format, data.max_records, "", template, "")
        held = DataFile(_existing(data.eval, "data.eval"), data.format, 0, "", template, "") if data.eval else None
        return [Source(_stem_names([data.train])[0], "data.train", train, held, data.eval_fraction, 0.0)]
    names = [s.name or n for s, n in zip(data.sources, _stem_names([s.path for s in data.sources]))]
    out = []
    for i, (s, name) in enumerate(zip(data.sources, names)):
        key = f"data.sources[{i}]"
        if names.index(name) != i:
            raise SFTError(f"config: '{key}' and 'data.sources[{names.index(name)}]' are both named {name!r}; "
                           f"give one of them name = \"...\"")
        label, tmpl = f"{key} {name!r}", s.template or template
        train = DataFile(_existing(s.path, f"{key}.path"), s.format, s.max_records, s.system, tmpl, label)
        held = DataFile(_existing(s.eval, f"{key}.eval"), s.format, 0, s.system, tmpl, label) if s.eval else None
        fraction = data.eval_fraction if s.eval_fraction < 0 else s.eval_fraction
        out.append(Source(name, key, train, held, fraction, s.weight))
    return out


def with_system(conv: Conversation, system: str) -> Conversation:
    """The conversation with `system` as its system message, unless it has one of its own."""
    if not system or (conv and conv[0]["role"] == "system"):
        return conv
    return Conversation([{"role": "system", "content": system}, *conv], conv.tools)


def held_out_conversations(n: int, fraction: float, seed: int) -> list[int]:
    """The numbers of the conversations held out: a seeded random `fraction` of n (at least 1
    when fraction > 0), in increasing order."""
    if fraction <= 0 or n == 0:
        return []
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:max(1, round(n * fraction))])


class HeldOutConversations(Sequence):
    """The held-out conversations of every source, read from the files only when asked for.

    parts: (file, conversation numbers, or None for every conversation of the file).
    """

    def __init__(self, parts: list[tuple[DataFile, list[int] | None]], sizes: list[int]):
        self.parts, self.sizes = parts, sizes

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._read(range(len(self))[index])
        return self._read([range(len(self))[index]])[0]

    def _read(self, wanted) -> list[Conversation]:
        out, base = {}, 0
        for (file, numbers), size in zip(self.parts, self.sizes):
            mine = {numbers[i - base] if numbers is not None else i - base: i for i in wanted if base <= i < base + size}
            for k, (_, conv) in enumerate(iter_conversations(file.path, file.format) if mine else ()):
                if k in mine:
                    out[mine.pop(k)] = with_system(conv, file.system)
                if not mine:
                    break
            base += size
        return [out[i] for i in wanted]
