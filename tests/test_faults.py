"""Faults as a specification: a crash, a bad step or a full disk never costs the user their work.

1. SIGKILL in the middle of a checkpoint save (a real process, killed between two files of the
   checkpoint): the previous checkpoint is complete and loads, the half-written one is ignored,
   and `run.resume=true` continues to the same losses as a run that was never killed.
2. A NaN/Inf loss or gradient: the optimizer step is skipped (weights stay finite), the skip is
   logged, and after more than `train.max_bad_steps` of them the run stops with a message
   naming that key; checkpoints already written stay usable.
3. A full disk (ENOSPC) while saving: the previous checkpoint and the final model folder are
   byte-for-byte unchanged, no half-written folder is left behind, and the space is given back.
   We mount a small tmpfs when we can (root with CAP_SYS_ADMIN) and fill it for real; elsewhere
   the writes of the save path are made to fail with ENOSPC.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from training import loop as T
from model.checkpoint import load_pretrained
from model.errors import SFTError
from model.tokenizer import Tokenizer
from training import checkpointing as ckpt
from training.config import load_config
from training.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"



def overrides(out_dir: Path, model: Path, name: str, *extra: str) -> list[str]:
    return [f"model.path={model}", f"run.out_dir={out_dir}", f"run.name={name}", f"data.train={QUICKSTART}",
            "data.max_records=16", "data.max_seq_len=96", "data.eval_fraction=0.25", "train.batch_size=2",
            "train.max_steps=4", "optim.lr=3e-3", "optim.warmup_steps=1", "eval.sample_prompts=0",
            "run.threads=1", *extra]


def train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}

# ----------------------------------------------------------------------------- 1. SIGKILL


# Runs train.py's main() in a child process whose torch.save (the trainer state, the last file
# of a checkpoint) announces itself and hangs when it writes step_2: the test kills it there.
KILLABLE = """
import sys, time, torch
marker, argv = sys.argv[1], sys.argv[2:]
real_save = torch.save
def hanging_save(obj, f, *a, **k):
    if "step_2" in str(f):
        open(marker, "w").close()
        time.sleep(600)
    return real_save(obj, f, *a, **k)
torch.save = hanging_save
import train
sys.exit(train.main(argv))
"""


def test_sigkill_during_checkpoint_save_keeps_last_checkpoint_and_resume_continues(tmp_path, tiny_dir):
    args = overrides(tmp_path, tiny_dir, "killed", "run.save_every=1", "run.keep_last_n=0")
    marker = tmp_path / "saving_step_2"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"never reached the step_2 save: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # mid-save: weights of step_2 written, trainer state not
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "killed"
    assert (run / ".tmp-step_2" / "model.safetensors").exists()        # really killed mid-save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')                               # and a kill mid-line, too
    assert not (run / "step_2").exists() and not (run / "final").exists()
    assert ckpt.latest_checkpoint(run) == run / "step_1"                # the half save is ignored
    assert load_pretrained(run / "step_1").config.hidden_size == 32    # the last complete one loads

    resumed = T.train(load_config(None, args + ["run.resume=true"]))
    assert resumed["steps"] == 4 and load_pretrained(resumed["final"])
    assert not list(run.glob(".tmp-*"))                                 # the next save cleaned up
    T.train(load_config(None, overrides(tmp_path, tiny_dir, "never_killed")))
    assert train_losses(run) == train_losses(tmp_path / "never_killed")  # same curve, step for step

# ----------------------------------------------------------------------------- 2. NaN / Inf


def poison_steps(monkeypatch, is_bad, value: float = float("nan")) -> None:
    """Make forward_backward's n-th call (1-based) with is_bad(n) return a `value` loss and fill
    every gradient with `value`, as an overflow or a corrupt batch would."""
    real, calls = T.forward_backward, [0]

    def poisoned(model, *args, **kwargs):
        calls[0] += 1
        loss = real(model, *args, **kwargs)
        if not is_bad(calls[0]):
            return loss
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(value)
        return value
    monkeypatch.setattr(T, "forward_backward", poisoned)


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_pretrained(folder).state_dict().values())


def test_nan_and_inf_steps_are_skipped_and_training_finishes(tmp_path, tiny_dir, monkeypatch):
    poison_steps(monkeypatch, lambda n: n == 2, float("nan"))
    out = T.train(load_config(None, overrides(tmp_path, tiny_dir, "nan", "train.max_bad_steps=2")))
    records = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skipped"] == [2]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert out["steps"] == 4 and all_finite(Path(out["final"]))
    monkeypatch.undo()
    poison_steps(monkeypatch, lambda n: n in (1, 3), float("inf"))
    out = T.train(load_config(None, overrides(tmp_path, tiny_dir, "inf", "train.max_bad_steps=2")))
    assert all_finite(Path(out["final"]))


def test_too_many_bad_steps_stop_the_run_with_a_message_naming_the_key(tmp_path, tiny_dir, monkeypatch):
    poison_steps(monkeypatch, lambda n: n >= 2)  # diverges after one good step
    cfg = load_config(None, overrides(tmp_path, tiny_dir, "diverged", "train.max_bad_steps=2",
                                      "train.max_steps=6", "run.save_every=1", "run.keep_last_n=0"))
    with pytest.raises(SFTError, match=r"train\.max_bad_steps") as err:
        T.train(cfg)
    assert "step 4" in str(err.value) and "\n" not in str(err.value)  # 3 bad steps > 2 allowed
    run = tmp_path / "diverged"
    assert not (run / "final").exists()                     # no final model from a diverged run
    assert ckpt.latest_checkpoint(run) is not None
    for _, folder in ckpt.step_dirs(run):                   # every checkpoint on disk is usable
        assert all_finite(folder)
    # the CLI says it on one line and exits 2 (max_bad_steps=0: stop at the first bad step)
    assert train.main(overrides(tmp_path, tiny_dir, "diverged_cli", "train.max_bad_steps=0")) == 2


# ----------------------------------------------------------------------------- 3. full disk


def _small_model_and_optimizer(tiny_dir: Path):
    model = load_pretrained(tiny_dir).train()
    opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95), 1e-8)
    sched = build_scheduler(opt, 1, 10, 0.1)
    model(torch.tensor([[1, 5, 9]])).float().mean().backward()
    opt.step()  # AdamW moments exist, so the trainer state has its real size
    return model, opt, sched


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _fill(folder: Path, leave_bytes: int) -> Path:
    """Write a filler file until only `leave_bytes` are free on folder's filesystem."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(max(0, free - leave_bytes)))
    return filler


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    """(run folder, fill()) where fill() makes the save path's writes fail with ENOSPC: for real
    on a 16 MB tmpfs (needs root), or by making the files it opens fail after a few bytes."""
    mnt = tmp_path / "disk"
    if request.param == "tmpfs":
        if not _mount_tmpfs(mnt, 16):
            pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN); 'patched' covers it")
        yield mnt / "run", lambda: _fill(mnt, 64 * 1024)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        return

    def fill():
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(bytes(data)[:64])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def no_space(obj, f, *a, **k):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
        monkeypatch.setattr(ckpt.torch, "save", no_space)
    yield mnt / "run", fill


def test_full_disk_while_saving_leaves_previous_outputs_intact(full_disk, tiny_dir):
    run, fill = full_disk
    run.mkdir(parents=True)
    model, opt, sched = _small_model_and_optimizer(tiny_dir)
    tok = Tokenizer.from_pretrained(tiny_dir)
    ckpt.save_checkpoint(run, 2, model, opt, sched, {"epoch": 0, "micro_batch": 2}, tokenizer=tok)
    ckpt.save_final(run, model, tok)
    before = digest(run)
    entries = sorted(p.name for p in run.iterdir())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next save would change every byte of the weights

    filler = fill()
    # ENOSPC ends in one line naming where the write failed (model/files.py), not an OSError
    with pytest.raises(SFTError, match=f"{run}.*No space left on device"):
        ckpt.save_checkpoint(run, 3, model, opt, sched, {"epoch": 0, "micro_batch": 3}, tokenizer=tok)
    with pytest.raises(SFTError, match="No space left on device"):
        ckpt.save_final(run, model, tok)

    assert digest(run) == before                                   # step_2/ and final/ unchanged
    assert sorted(p.name for p in run.iterdir()) == entries        # nothing half-written, even hidden
    assert ckpt.latest_checkpoint(run) == run / "step_2"
    fresh, opt2, sched2 = _small_model_and_optimizer(tiny_dir)
    state = ckpt.load_checkpoint(run / "step_2", fresh, opt2, sched2)
    assert state["step"] == 2 and all_finite(run / "final")
    if filler is not None:
        filler.unlink()
