"""The run's configuration: one dataclass, filled from a TOML file and `key=value` overrides.

A run is described by plain values grouped in sections (`[run]`, `[model]`, `[data]`,
`[train]`, `[optim]`, `[eval]`, `[lora]`). They are read in three layers, later wins:

    defaults in this file  <  the TOML file (`--config configs/NAME.toml`)  <  `section.key=value`

An override's value is parsed as a TOML value (`optim.lr=3e-4` is a float, `run.resume=true` a
bool, `lora.targets=["q_proj","v_proj"]` a list); anything that is not valid TOML is taken as a
string (`run.name=my_run`). It is then checked against the field's declared type, so a typo'd
number fails here, naming the key, instead of deep inside the loop. A bare key (`lr=3e-4`) is
accepted when exactly one section has it.

An unknown key is the most common config bug in every tool that silently ignores it (the run
trains with the default you meant to change). Here it is an `SFTError` that names the key, the
file, and the closest known key (difflib). `--help` prints every option with its default and a
one-line description, generated from the same dataclass so it cannot go stale.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from data.masking import STRATEGIES
from data.templates import TEMPLATES
from model.errors import SFTError
from model.files import atomic_write, read_text


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description (shown by --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = opt("quickstart", "run folder name: outputs go to <out_dir>/<name>/")
    out_dir: str = opt("checkpoints", "parent folder of run folders")
    seed: int = opt(0, "seed for shuffling, held-out split and initialisation")
    resume: bool = opt(False, "continue from the newest complete step_N/ in the run folder")
    overwrite: bool = opt(False, "start afresh even if the run folder already holds checkpoints")
    save_every: int = opt(0, "save step_N/ every N optimizer steps (0: only the final model)")
    keep_last_n: int = opt(2, "keep only the newest N step_N/ folders (0: keep all)")
    threads: int = opt(2, "torch CPU threads (0: torch's default)")
    device: str = opt("auto", "cpu, cuda or auto (cuda when available)")


@dataclass
class ModelConfig:
    path: str = opt("checkpoints/pico-base", "base model folder in Hugging Face layout")
    dtype: str = opt("float32", "float32; bf16-mixed (fp32 weights and AdamW state, bf16 matmuls); "
                     "bfloat16 (one process: pure bf16, no fp32 copy). Under torchrun both bf16 "
                     "options keep fp32 shards and compute in bf16")
    finetune: str = opt("full", "which weights train: full, lora or qlora")


@dataclass
class DataConfig:
    train: str = opt("data/quickstart/alpaca_300.jsonl", "training conversations file")
    format: str = opt("auto", "file format for load_conversations (auto detects)")
    eval: str = opt("", "held-out file; empty: split eval_fraction off the training file")
    eval_fraction: float = opt(0.05, "share of training conversations held out when eval is empty")
    max_records: int = opt(0, "use only the first N conversations of the file (0: all)")
    template: str = opt("auto", "chat template name; auto: from the tokenizer, else alpaca")
    max_seq_len: int = opt(512, "tokens per packed row; longer conversations are truncated")
    loss_on: str = opt("train_on_assistant", "masking strategy passed to tokenize_conversation")


@dataclass
class TrainConfig:
    batch_size: int = opt(8, "packed rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    epochs: float = opt(1.0, "passes over the training rows (used when max_steps is 0)")
    max_steps: int = opt(0, "optimizer steps; 0: derived from epochs")
    loss_chunk: int = opt(0, "tokens per chunk of the output head + cross-entropy; 0 = auto (~8 MiB of logits)")
    activation_checkpointing: bool = opt(False, "recompute each block in backward: about 1/3 "
                                         "more compute for a fraction of the activation memory")
    compile: bool = opt(False, "torch.compile each transformer block (slow first steps)")
    log_every: int = opt(1, "write a metrics.jsonl line every N steps")
    max_bad_steps: int = opt(5, "NaN/Inf steps skipped before the run stops (0: stop at the first)")


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (cosine floor)")
    warmup_steps: int = opt(10, "linear warmup steps from 0 to lr")
    weight_decay: float = opt(0.0, "AdamW decay on matrices (never on norms, biases, 1-D)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)")


@dataclass
class EvalConfig:
    every: int = opt(0, "held-out loss every N steps (0: only before and after training)")
    max_rows: int = opt(0, "evaluate on at most N packed held-out rows (0: all)")
    sample_prompts: int = opt(1, "held-out prompts to generate answers for after training")
    max_new_tokens: int = opt(64, "tokens generated per sample prompt")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank (finetune = lora or qlora)")
    alpha: float = opt(16.0, "LoRA scale numerator: the update is scaled by alpha / r")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    targets: list = opt(["q_proj", "v_proj"], "module names that get adapters")
    save_merged: bool = opt(False, "also write <run>/merged/: base + adapter as one full HF model")


@dataclass
class DemoConfig:
    backtranslate: bool = opt(False, "the offline demo: build data.train from the base model's own texts "
                              "(data/backtranslate.py) and score held-out constraints before/after")
    constraints: list = opt([], "IFEval instruction ids to teach and test (empty: all in data/demo_wordings.py)")
    mix: str = opt("", "real instruction data mixed into the built training set")
    mix_records: int = opt(0, "use only the first N conversations of mix (0: all)")
    texts_per_topic: int = opt(8, "teacher texts sampled per training topic")
    pairs_per_text: int = opt(4, "constraints derived from each teacher text")
    heldout_per_type: int = opt(10, "held-out evaluation prompts per constraint type")
    max_new_tokens: int = opt(96, "greedy tokens per held-out answer")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.dtype": ("float32", "bf16-mixed", "bfloat16"),
    "model.finetune": ("full", "lora", "qlora"),
    "data.template": ("auto", *TEMPLATES),
    "data.loss_on": STRATEGIES,
}


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every option as 'section.key', in declaration order."""
    cfg = cfg or Config()
    return [f"{s}.{f.name}" for s, sec in _sections(cfg).items() for f in dataclasses.fields(sec)]


# names other tools use for our options: difflib cannot guess that learning_rate means lr
ALIASES = {"learning_rate": "optim.lr", "gradient_accumulation_steps": "train.grad_accum",
           "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
           "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
           "warmup": "optim.warmup_steps", "max_grad_norm": "optim.grad_clip",
           "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
           "target_modules": "lora.targets", "output_dir": "run.out_dir",
           "cutoff_len": "data.max_seq_len", "max_length": "data.max_seq_len"}


def _unknown(key: str, where: str) -> SFTError:
    keys = all_keys()
    close = [ALIASES[key.split(".")[-1]]] if key.split(".")[-1] in ALIASES else \
        difflib.get_close_matches(key, keys + [k.split(".")[1] for k in keys], n=1, cutoff=0.5)
    if close and "." not in close[0]:  # matched a bare name: show it with its section
        close = [k for k in keys if k.endswith("." + close[0])][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the options"
    return SFTError(f"{where}: unknown config key '{key}'{hint}")


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check `value` against the field type; widen int->float and scalars->str where harmless."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ is list and isinstance(value, str):  # `lora.targets=q_proj,v_proj`
        return [v.strip() for v in value.split(",") if v.strip()]
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise SFTError(f"{where}: '{key}' must be {typ.__name__}, got {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    if "." not in key:  # bare key: accept when exactly one section owns it
        owners = [k for k in all_keys(cfg) if k.split(".")[1] == key]
        if len(owners) != 1:
            raise _unknown(key, where) if not owners else SFTError(
                f"{where}: '{key}' is ambiguous, write one of {', '.join(owners)}")
        key = owners[0]
    section, name = key.split(".", 1)
    sec = _sections(cfg).get(section)
    if sec is None or name not in {f.name for f in dataclasses.fields(sec)}:
        raise _unknown(key, where)
    value = _coerce(value, get_type_hints(type(sec))[name], key, where)
    if key in CHOICES and value not in CHOICES[key]:
        close = difflib.get_close_matches(str(value), CHOICES[key], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SFTError(f"{where}: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}{hint}")
    setattr(sec, name, value)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # not a TOML literal: a bare string such as a path or a name


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then `key=value` overrides; raises SFTError on bad keys."""
    cfg = Config()
    if path is not None:
        try:
            data = tomllib.loads(read_text(path, "config file"))
        except tomllib.TOMLDecodeError as e:
            raise SFTError(f"{path}: not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):  # a top-level `key = value` outside any section
                _set(cfg, section, table, str(path))
                continue
            for name, value in table.items():
                _set(cfg, f"{section}.{name}", value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SFTError(f"command line: expected key=value, got '{item}'")
        _set(cfg, key.strip(), _parse_value(text.strip()), "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    checks = [
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.loss_chunk >= 0, "train.loss_chunk must be >= 0 (0 = auto)"),
        (cfg.train.max_steps >= 0 and cfg.train.epochs >= 0, "train.max_steps and train.epochs must be >= 0"),
        (cfg.train.max_steps > 0 or cfg.train.epochs > 0, "set train.max_steps or train.epochs > 0"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.max_bad_steps >= 0, "train.max_bad_steps must be >= 0"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (cfg.data.max_seq_len >= 8, "data.max_seq_len must be >= 8"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.run.keep_last_n >= 0, "run.keep_last_n must be >= 0"),
        (cfg.run.save_every >= 0, "run.save_every must be >= 0"),
        (cfg.data.max_records >= 0, "data.max_records must be >= 0"),
        (cfg.lora.r >= 1, "lora.r (the LoRA rank) must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SFTError(f"config: {msg}")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (readable back with load_config)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)
    lines = []
    for section, sec in _sections(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{f.name} = {fmt(getattr(sec, f.name))}" for f in dataclasses.fields(sec)]
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    """One line per option: key, default, description."""
    rows = []
    for section, sec in _sections(Config()).items():
        for f in dataclasses.fields(sec):
            rows.append((f"{section}.{f.name}", repr(getattr(sec, f.name)), f.metadata["help"]))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"  {k:<{w0}}  {d:<{w1}}  {h}" for k, d, h in rows)


def options_markdown() -> str:
    """The options table for the README, from the same source as --help."""
    out = ["| option | default | meaning |", "|---|---|---|"]
    for section, sec in _sections(Config()).items():
        for f in dataclasses.fields(sec):
            d = repr(getattr(sec, f.name)).replace("|", "\\|")
            out.append(f"| `{section}.{f.name}` | `{d}` | {f.metadata['help']} |")
    return "\n".join(out)


def save_toml(cfg: Config, path: Path) -> None:
    """Atomic write of the resolved config."""
    atomic_write(path, to_toml(cfg))
