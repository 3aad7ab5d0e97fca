"""The run folder, periodic checkpoints, exact resume, and pruning.

    checkpoints/<run_name>/
        config.toml        the resolved config (defaults + file + overrides)
        metrics.jsonl      one line per logged step / eval (training/metrics.py)
        loss.svg           the loss curve
        step_200/          a complete checkpoint: the model in Hugging Face layout
            config.json, model.safetensors, tokenizer files ...   (load_pretrained reads it)
            trainer_state.pt   optimizer, scheduler, RNG states, data position, step
        final/             the model at the end of training (HF layout)

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
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_pretrained, save_pretrained
from model.errors import SFTError
from model.files import remove_folder, write_folder
from training import distributed as D

STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"


def prepare_run_dir(out_dir: str, name: str, resume: bool, overwrite: bool) -> Path:
    """Create <out_dir>/<name>; refuse to silently mix a new run into an old one."""
    run_dir = Path(out_dir) / name
    if run_dir.exists() and not resume:
        old = step_dirs(run_dir) or (run_dir / "final").exists()
        if old and not overwrite:
            raise SFTError(f"run folder {run_dir} already holds checkpoints: pass run.resume=true "
                           f"to continue it, run.overwrite=true to replace it, or another run.name")
        if old:  # overwrite: clear the previous run's outputs, keep nothing stale
            for child in run_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    finetune: str = "full", weights: bool = True) -> dict:
    """Restore model, optimizer, scheduler and RNG from step_N/; returns the saved state.

    weights=False: the caller loaded them already (train.py does, before FSDP shards the model).
    """
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise SFTError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    if weights:
        load_weights(model, path, finetune)
    # weights_only=True: a checkpoint folder may come from anywhere, and a full unpickler runs code
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SFTError(f"{path / STATE_FILE}: not a trainer state this version can read "
                       f"({str(e).strip().splitlines()[0]})") from None
    D.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
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
