"""Periodic checkpoints, exact resume -- or a refused one -- and pruning.

    checkpoints/<run_name>/
        config.toml        the resolved config (defaults + file + overrides)
        metrics.jsonl      one line per logged step / eval (training/metrics.py)
        loss.svg           the loss curve
        step_200/          a complete checkpoint: the model in Hugging Face layout
            config.json, model.safetensors, tokenizer files ...   (load_pretrained reads it)
            trainer_state.pt   optimizer, scheduler, RNG states, data position, step, settings
        final/             the model at the end of training (HF layout)

(training/run_folder.py: who may write there, and what happens to an earlier run.)

Crash safety (model/files.py `write_folder`). A checkpoint is written into `.tmp-step_N/`
beside the others and renamed to `step_N/` only when every file is on disk; rename within one
directory is atomic, so a folder named `step_N` is always complete, and a crash mid-save leaves
a stray `.tmp-*` that is ignored (and cleaned by the next save). Pruning renames a folder to
`.trash-*` before deleting it, so a half-deleted checkpoint never looks complete either.

Exact resume needs everything that influences the next step: weights, AdamW moments and step
counts, the scheduler's step, the RNG states (python, numpy, torch CPU and CUDA: dropout and
any sampling), and the data position (the rows of step s are a pure function of seed and s,
see training/distributed.py `step_rows`, so the position is the step number; rows seen is
stored beside it for people). With those restored, the loss curve after resume is
bit-identical to an uninterrupted run (tests/test_train.py checks it).

Exact or refused. That holds only if the run goes on with the settings it started with: a new
`optim.lr` would be silently overridden by the scheduler state just loaded, a new
`train.batch_size` would put the data position in the wrong place. So each checkpoint stores the
settings that shape training (`shaping_settings`: every option except the few in FREE that only
change speed, logging or saving, plus the sha256 of the data files and a fingerprint of the base
model), and a resume with any of them changed is refused with the list of changes.

A trainer state is read with `torch.load(weights_only=True)` (a full unpickler runs code) and
then checked key by key before anything is applied: its step within the run, the optimizer state
naming exactly this run's trainable parameters with their shapes. A checkpoint that cannot be
read at all (a truncated file) gives way to the previous complete one, with a notice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.checkpoint import load_pretrained, save_pretrained
from model.errors import SFTError
from model.files import read_bytes, remove_folder, write_folder
from training import distributed as D

STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"

# options that may change between a checkpoint and its resume: speed, logging, saving, where
FREE = frozenset({"run.name", "run.out_dir", "run.resume", "run.overwrite", "run.save_every",
                  "run.keep_last_n", "run.threads", "run.device", "train.loss_chunk",
                  "train.activation_checkpointing", "train.compile", "train.speedups", "train.log_every",
                  "train.max_bad_steps", "eval.every", "eval.max_rows", "eval.sample_prompts",
                  "eval.max_new_tokens", "lora.save_merged"})


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not Path(run_dir).is_dir():
        return []
    found = []
    for p in Path(run_dir).iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def rng_state() -> dict:
    # numpy's key array is stored as a tensor: the state file then holds only tensors, numbers,
    # strings and tuples, which torch.load(weights_only=True) reads without unpickling code
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: torch.nn.Module, folder: Path, tokenizer=None, finetune: str = "full",
                 generation_config: dict | None = None, state_dict: dict | None = None) -> None:
    """What a checkpoint keeps of the model: the full HF model, or (LoRA) the adapter."""
    if finetune == "full":
        save_pretrained(model, folder, tokenizer=tokenizer, generation_config=generation_config,
                        state_dict=state_dict)
    else:
        from lora import save_adapter  # issue 6 seam: adapters only, PEFT layout
        save_adapter(model, folder, state_dict=state_dict)


def gather_weights(model: torch.nn.Module, finetune: str) -> dict:
    """Full tensors of what save_weights writes, on rank 0 ({} elsewhere). Every rank must call
    it: under FSDP it all-gathers the shards (LoRA: only the adapters, never the frozen base)."""
    return D.full_model_state_dict(model, trainable_only=finetune != "full")


def load_weights(model: torch.nn.Module, folder: Path, finetune: str = "full") -> None:
    """Inverse of save_weights, into an already built model (same shapes, same device)."""
    if finetune == "full":
        saved = load_pretrained(folder).state_dict()
        with torch.no_grad():
            for name, p in model.state_dict().items():
                if name not in saved or saved[name].shape != p.shape:
                    raise SFTError(f"{folder}: holds no weight {name!r} of shape {tuple(p.shape)} for this model")
                p.copy_(saved[name])
    else:
        from lora import load_adapter
        load_adapter(model, folder)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    data_position: dict, *, tokenizer=None, finetune: str = "full",
                    keep_last_n: int = 0, generation_config: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write step_<step>/ atomically, then prune to the newest keep_last_n (0: keep all)."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step}"
    # every rank gathers (collective); the optimizer state is keyed by parameter name, so any
    # number of processes can load it. Rank 0 alone writes.
    weights = gather_weights(model, finetune)
    optim = D.full_optimizer_state_dict(model, optimizer)
    if D.rank() == 0:
        state = {"step": step, "optimizer": optim,
                 "scheduler": scheduler.state_dict(), "rng": rng_state(),
                 "data_position": data_position, **(extra or {})}
        with write_folder(final) as tmp:
            save_weights(model, tmp, tokenizer, finetune, generation_config, weights)
            torch.save(state, tmp / STATE_FILE)  # inside the temporary folder: a plain write
        prune(run_dir, keep_last_n)
    D.barrier()
    return final


def prune(run_dir: Path, keep_last_n: int) -> None:
    if keep_last_n <= 0:
        return
    for _, path in step_dirs(run_dir)[:-keep_last_n]:
        remove_folder(path)


# ----------------------------------------------------------------------------- resume: exact or refused


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise SFTError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of config.json and, for each weights file, its name, size and first and last MiB:
    tells two base models apart in milliseconds (a whole 7B model would take a minute to hash)."""
    folder, h = Path(folder), hashlib.sha256()
    h.update(read_bytes(folder / "config.json", "model config.json"))
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, size - (1 << 20)))
            h.update(f"{path.name}:{size}".encode() + head + f.read())
    return h.hexdigest()


FILES = ("model.path", "data.train", "data.eval")  # compared by content, not by path


def shaping_settings(cfg, files: bool = True) -> dict:
    """Every option of `cfg` that shapes training ("section.key" -> value), with the data files
    and the base model identified by content rather than by path (a moved folder is the same);
    files=False leaves those three out."""
    out = {}
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key = f"{section.name}.{f.name}"
            if key not in FREE:
                value = getattr(getattr(cfg, section.name), f.name)
                out[key] = list(value) if isinstance(value, (list, tuple)) else value
    if not files:
        return {k: v for k, v in out.items() if k not in FILES}
    out["model.path"] = f"model fingerprint {model_fingerprint(cfg.model.path)[:16]}"
    for key in ("data.train", "data.eval"):
        if out.get(key):
            out[key] = f"file sha256 {file_digest(out[key])[:16]}"
    return out


def saved_settings(state: dict, run_dir: Path, log: Callable[[str], None]) -> dict:
    """What a checkpoint says its run was started with; a checkpoint written before settings
    were stored is compared with the run's config.toml instead (without the file contents)."""
    if "settings" in state:
        return state["settings"]
    from training.config import load_config
    try:
        return shaping_settings(load_config(Path(run_dir) / "config.toml"), files=False)
    except SFTError as e:
        log(f"note: cannot check that the settings are unchanged ({e})")
        return {}


def settings_changes(saved: dict, now: dict) -> list[str]:
    """'key: old -> new' for each setting that differs (keys one side lacks are not compared:
    an option added since the checkpoint was written)."""
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]


def _state_error(path: Path, what: str) -> SFTError:
    return SFTError(f"{path}: {what}; this is not a trainer state this run can continue from")


def read_trainer_state(folder: Path) -> dict:
    """The trainer state of step_N/, its layout checked (no part of it applied yet).
    A file that cannot be read at all raises UnreadableCheckpoint."""
    path = Path(folder) / STATE_FILE
    if path.is_dir():
        raise UnreadableCheckpoint(f"{path}: is a directory, not a trainer state")
    # weights_only=True: a checkpoint folder may come from anywhere, and a full unpickler runs code
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnreadableCheckpoint(f"{path}: not a trainer state this version can read "
                                   f"({str(e).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise _state_error(path, f"a {type(state).__name__}, not a dict")
    for key, kind in (("step", int), ("optimizer", dict), ("scheduler", dict), ("rng", dict),
                      ("data_position", dict)):
        if key not in state:
            raise _state_error(path, f"no {key!r} entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _state_error(path, f"{key!r} is a {type(state[key]).__name__}, not a {kind.__name__}")
    if state["step"] < 1:
        raise _state_error(path, f"'step' is {state['step']}")
    sched = state["scheduler"]
    if not isinstance(sched.get("last_epoch"), int) or not isinstance(sched.get("base_lrs"), list):
        raise _state_error(path, "'scheduler' has no int 'last_epoch' and list 'base_lrs'")
    rng = state["rng"]
    if not (isinstance(rng.get("python"), tuple) and isinstance(rng.get("numpy"), tuple)
            and len(rng["numpy"]) == 5 and isinstance(rng.get("torch"), torch.Tensor)):
        raise _state_error(path, "'rng' lacks the python, numpy and torch generator states")
    if not isinstance(state.get("settings", {}), dict):
        raise _state_error(path, "'settings' is not a dict")
    return state


def check_optimizer_state(saved: dict, model: torch.nn.Module, path: Path) -> None:
    """The optimizer state names exactly the trainable parameters, with their shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise _state_error(path, "'optimizer' has no 'state' dict and 'param_groups' list")
    named = [n for g in groups for n in g["params"]]
    strangers = [n for n in [*named, *state] if n not in params]
    if strangers:
        raise _state_error(path, f"the optimizer state is for parameter {strangers[0]!r}, which this run does "
                           "not train (a checkpoint of another model or finetune mode?)")
    missing = [n for n in params if n not in named]
    if missing:
        raise _state_error(path, f"the optimizer state has no entry for the trainable parameter {missing[0]!r}")
    for name, entry in state.items():
        if not isinstance(entry, dict):
            raise _state_error(path, f"the optimizer state of {name!r} is a {type(entry).__name__}, not a dict")
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != params[name].shape):
                raise _state_error(path, f"optimizer state {name}.{key} has shape {tuple(getattr(t, 'shape', ()))}, "
                                   f"the parameter {tuple(params[name].shape)}")


class UnreadableCheckpoint(SFTError):
    """A checkpoint file that cannot be read at all (truncated, corrupt): an older one may do."""


def resume_point(run_dir: Path, model: torch.nn.Module, finetune: str, settings: dict, total_steps: int,
                 log: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The newest checkpoint of run_dir that this run can continue from, its weights loaded into
    `model` (before FSDP shards it); (folder, state) or None when there is none. A checkpoint
    that cannot be read gives way to the one before it; one with other settings is refused."""
    dirs = [p for _, p in reversed(step_dirs(run_dir))]
    for i, folder in enumerate(dirs):
        try:
            state = read_trainer_state(folder)
            changes = settings_changes(saved_settings(state, run_dir, log), settings)
            if changes:
                raise SFTError(f"{folder}: resuming with other settings than the run was started with is refused, "
                               f"they change its math or data order ({'; '.join(changes)}): put them back, or start "
                               "a new run (another run.name, or run.overwrite=true)")
            if state["step"] > total_steps:
                raise _state_error(folder / STATE_FILE, f"step {state['step']} is beyond this run's "
                                   f"{total_steps} steps")
            try:
                load_weights(model, folder, finetune)
            except SFTError as e:
                raise UnreadableCheckpoint(str(e)) from None
            return folder, state
        except UnreadableCheckpoint as e:
            if i + 1 == len(dirs):
                raise
            log(f"note: {e}; resuming from the checkpoint before it, {dirs[i + 1]}")
    return None


def restore_state(state: dict, folder: Path, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Apply a trainer state read by read_trainer_state (after FSDP, into the built optimizer)."""
    path = Path(folder) / STATE_FILE
    check_optimizer_state(state["optimizer"], model, path)
    try:
        D.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise _state_error(path, str(e).strip().splitlines()[0][:200]) from None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    finetune: str = "full", weights: bool = True) -> dict:
    """Restore model, optimizer, scheduler and RNG from step_N/; returns the saved state.
    weights=False: the caller loaded them already (before FSDP shards the model)."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise SFTError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    state = read_trainer_state(path)
    if weights:
        load_weights(model, path, finetune)
    restore_state(state, path, model, optimizer, scheduler)
    return state


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer=None, finetune: str = "full",
               generation_config: dict | None = None) -> Path:
    """The finished model in HF layout under <run_dir>/final/, written atomically by rank 0
    (every rank must call it: the weights are gathered from all of them)."""
    final = Path(run_dir) / "final"
    weights = gather_weights(model, finetune)
    if D.rank() == 0:
        with write_folder(final) as tmp:
            save_weights(model, tmp, tokenizer, finetune, generation_config, weights)
    D.barrier()
    return final
