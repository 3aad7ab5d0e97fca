"""The training run's options: typed sections read from a TOML file and `key=value` overrides.

A run is described by plain values grouped in sections (`[run]`, `[model]`, `[data]`,
`[train]`, `[optim]`, `[eval]`, `[lora]`), read in three layers, later wins:

    defaults in this file  <  the TOML file (`--config configs/NAME.toml`)  <  `section.key=value`

model/options.py does the reading and checking, the same way for every tool: each value is
checked where it enters against its declared type, its choices (a `Literal`) and its range, so
`optim.beta1=1.5` or `train.epochs=inf` fails here, naming the key, instead of deep inside the
loop; an unknown key is an error naming the closest known one. `--help` prints every option
with its default and a one-line description, generated from the same dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import DataConfig, validate_data
from model.errors import SFTError
from model.files import atomic_write
from model.options import all_keys as _all_keys
from model.options import help_text as _help_text
from model.options import load_options, opt
from model.options import options_markdown as _options_markdown
from model.options import to_toml

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["float32", "bf16-mixed", "bfloat16"]
Finetune = Literal["full", "lora", "qlora"]
GGUFType = Literal["", "f32", "f16", "bf16", "q8_0", "q4_0"]


@dataclass
class RunConfig:
    name: str = opt("quickstart", "run folder name: outputs go to <out_dir>/<name>/")
    out_dir: str = opt("checkpoints", "parent folder of run folders")
    seed: int = opt(0, "seed for shuffling, held-out split and initialisation", ge=0)
    resume: bool = opt(False, "continue from the newest complete step_N/ in the run folder")
    overwrite: bool = opt(False, "start afresh even if the run folder already holds checkpoints")
    save_every: int = opt(0, "save step_N/ every N optimizer steps (0: only the final model)", ge=0)
    keep_last_n: int = opt(2, "keep only the newest N step_N/ folders (0: keep all)", ge=0)
    threads: int = opt(2, "torch CPU threads (0: torch's default)", ge=0)
    device: Device = opt("auto", "where to train (auto: cuda when available)")


@dataclass
class ModelConfig:
    path: str = opt("checkpoints/pico-base", "base model folder in Hugging Face layout")
    dtype: Dtype = opt("float32", "float32; bf16-mixed (fp32 weights and AdamW state, bf16 matmuls); "
                       "bfloat16 (one process: pure bf16, no fp32 copy). Under torchrun both bf16 "
                       "options keep fp32 shards and compute in bf16")
    finetune: Finetune = opt("full", "which weights train")
    init_untrained_tokens: bool = opt(False, "set the embedding rows of special tokens the data uses "
                                      "that look untrained (base checkpoints) to the mean of the "
                                      "trained rows (full fine-tuning only; model/untrained.py)")


@dataclass
class TrainConfig:
    batch_size: int = opt(8, "packed rows per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step (all processes together)", ge=1)
    epochs: float = opt(1.0, "passes over the training rows (used when max_steps is 0)", ge=0)
    max_steps: int = opt(0, "optimizer steps; 0: derived from epochs", ge=0)
    loss_chunk: int = opt(0, "tokens per chunk of the output head + cross-entropy; 0 = auto "
                          "(~8 MiB of logits)", ge=0)
    activation_checkpointing: bool = opt(False, "recompute each block in backward: about 1/3 "
                                         "more compute for a fraction of the activation memory")
    compile: bool = opt(False, "torch.compile each transformer block, left plain for inductor to fuse: "
                         "faster steps, more memory, a slow first step; needs a C++ compiler on CPU")
    speedups: bool = opt(True, "CPU speed/memory work applied to the model (model/speedups.py): "
                         "the GEMM library per product (calibrated once per machine), lean norm/SwiGLU backward, recomputed activations")
    log_every: int = opt(1, "write a metrics.jsonl line every N steps", ge=1)
    max_bad_steps: int = opt(5, "NaN/Inf steps skipped before the run stops (0: stop at the first)", ge=0)


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate", gt=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (cosine floor)", ge=0, le=1)
    warmup_steps: int = opt(10, "linear warmup steps from 0 to lr", ge=0)
    weight_decay: float = opt(0.0, "AdamW decay on matrices (never on norms, biases, 1-D)", ge=0)
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)", ge=0)


@dataclass
class EvalConfig:
    every: int = opt(0, "held-out loss every N steps (0: only before and after training)", ge=0)
    max_rows: int = opt(0, "evaluate on at most N packed held-out rows (0: all)", ge=0)
    sample_prompts: int = opt(1, "held-out prompts to generate answers for after training", ge=0)
    max_new_tokens: int = opt(64, "tokens generated per sample prompt", ge=1)


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank (finetune = lora or qlora)", ge=1)
    alpha: float = opt(16.0, "LoRA scale numerator: the update is scaled by alpha / r", gt=0)
    dropout: float = opt(0.0, "dropout on the LoRA input", ge=0, lt=1)
    targets: list[str] = opt(["q_proj", "v_proj"], "module names that get adapters, or all-linear")
    save_merged: bool = opt(False, "also write <run>/merged/: base + adapter as one full HF model")


@dataclass
class ExportConfig:
    gguf: GGUFType = opt("", "also write <run>/<run.name>-<type>.gguf for llama.cpp / Ollama "
                         "(model/gguf.py; empty: none); a LoRA/QLoRA run needs lora.save_merged=true")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# names other tools use for our options: difflib cannot guess that learning_rate means lr
ALIASES = {"learning_rate": "optim.lr", "gradient_accumulation_steps": "train.grad_accum",
           "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
           "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
           "warmup": "optim.warmup_steps", "max_grad_norm": "optim.grad_clip",
           "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
           "target_modules": "lora.targets", "output_dir": "run.out_dir",
           "cutoff_len": "data.max_seq_len", "max_length": "data.max_seq_len"}


def load_config(path=None, overrides=(), schema: type = Config) -> Config:
    """Defaults, then the TOML file, then `key=value` overrides; every value checked.
    `schema`: Config or a subclass with more sections (the demo's config adds [demo])."""
    cfg = load_options(schema, path, overrides, ALIASES)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that a type or a range alone cannot express."""
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise SFTError("config: set train.max_steps or train.epochs > 0")
    validate_data(cfg.data)
    if cfg.model.init_untrained_tokens and cfg.model.finetune != "full":
        raise SFTError(f"config: model.init_untrained_tokens=true changes base-model embedding rows, "
                       f"which a {cfg.model.finetune} adapter does not save; use model.finetune=full")
    if cfg.export.gguf and cfg.model.finetune != "full" and not cfg.lora.save_merged:
        raise SFTError(f"config: export.gguf={cfg.export.gguf} with model.finetune={cfg.model.finetune} is "
                       "written from the merged model: set lora.save_merged=true too")
    if not cfg.run.name.strip() or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise SFTError(f"config: 'run.name' must be a folder name (no '/'), got {cfg.run.name!r}")


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every option as 'section.key', in declaration order."""
    return _all_keys(cfg or Config())


def help_text(schema: type = Config) -> str:
    return _help_text(schema)


def options_markdown(schema: type = Config) -> str:
    return _options_markdown(schema)


def save_toml(cfg: Config, path: Path) -> None:
    """Atomic write of the resolved config (readable back with load_config)."""
    atomic_write(path, to_toml(cfg))
