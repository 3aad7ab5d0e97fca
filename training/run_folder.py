"""The run folder's life: one run at a time, and an earlier run never destroyed for nothing.

`<out_dir>/<name>/` holds a run's outputs (training/checkpointing.py lists them). Three rules:

1. A run touches its folder only after everything it reads has been read and checked (config,
   tokenizer, data, model, optimizer, the checkpoint it resumes from: training/loop.py `setup`).
   A mistake in any of them changes nothing on disk.
2. One run at a time. `RunFolder.open` creates `<name>/.lock` with O_EXCL (exactly one process
   can create a file) holding {"pid", "host"}; a second run on the same folder fails naming the
   process that holds it. A lock left by a process that no longer exists (a crash, SIGKILL) is
   taken over with a notice. A lock from another host cannot be checked, so it is refused with
   the advice to delete it if that run is gone. Under torchrun, rank 0 takes it.
3. What was in the folder survives until the new run has something to replace it with. A new
   run (not a resume) moves the folder's contents aside to the sibling `<name>.previous/`. If
   the run fails or is stopped before it has saved anything (a step_N/ checkpoint or final/),
   its files are removed and the earlier contents moved back: the folder is exactly as it was.
   When it finishes (final/ written; also after a resume), `<name>.previous/` is deleted. In
   between -- a run that saved a checkpoint and then failed -- both are kept, with a note.
   Whether a new run may replace a folder's contents at all is decided before anything moves:
   a folder with step_N/ checkpoints needs run.resume=true (continue) or run.overwrite=true; a
   finished run (final/, no step_N/) has nothing to resume and needs run.overwrite=true; a
   `<name>.previous/` that still holds a run (kept as in 3.) must be dealt with by hand first.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from model.cli import uninterrupted
from model.errors import SFTError
from model.files import remove_folder
from training import distributed as D
from training.checkpointing import step_dirs

LOCK = ".lock"
OUTPUTS = ("final", "merged")  # besides step_N/: what makes a folder hold a run worth keeping


def holds_run(folder: Path) -> bool:
    """A finished model or a checkpoint lives here (not just a config and a metrics log)."""
    return folder.is_dir() and (bool(step_dirs(folder)) or any((folder / o).is_dir() for o in OUTPUTS))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
    return holder if ok else None


def take_lock(folder: Path, log: Callable[[str], None]) -> None:
    """Create folder/.lock for this process, or raise naming the process that holds it."""
    lock, host = folder / LOCK, socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:
                raise SFTError(f"{lock}: a lock file that is not ours to read; if no run is using {folder}, "
                               "delete it") from None
            pid = holder["pid"]
            if holder["host"] != host:
                raise SFTError(f"{folder} is locked by process {pid} on host {holder['host']} ({lock}); "
                               "if that run is gone, delete the lock file") from None
            if pid != os.getpid() and _alive(pid):
                raise SFTError(f"{folder} is in use by process {pid} (lock file {lock}): wait for that run "
                               "to end or stop it, or choose another run.name") from None
            if pid != os.getpid():
                log(f"{lock}: process {pid} that held it is gone; taking the lock over")
            lock.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise SFTError(f"{lock}: cannot create the lock file ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host}, f)
        return
    raise SFTError(f"{lock}: could not take the lock (another run starting in {folder} at the same time?)")


def release_lock(folder: Path) -> None:
    lock = folder / LOCK
    holder = _read_lock(lock)
    if holder and holder["pid"] == os.getpid():
        lock.unlink(missing_ok=True)


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (deepest last)."""
    made = []
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            try:
                p.mkdir()
            except OSError as e:
                raise SFTError(f"{p}: cannot create the run folder ({e.strerror})") from None
            made.append(p)
        elif not p.is_dir():
            raise SFTError(f"{p}: not a folder; run.out_dir and run.name must name a folder to write the run in")
    return made


def refuse_replacing(folder: Path, resume: bool, overwrite: bool, resumed: bool) -> None:
    """Raise when this start would mix into or replace an earlier run without being asked to.
    `resumed`: a checkpoint of the folder was loaded (run.resume=true found one)."""
    if resumed:
        return
    if resume and (folder / "final").is_dir():
        raise SFTError(f"{folder}: run.resume=true, but it holds a finished run (final/) and no step_N/ "
                       "checkpoint to continue from; pass run.overwrite=true to replace it (kept in "
                       f"{folder.name}.previous until the new run finishes) or choose another run.name")
    if overwrite or not holds_run(folder):
        return
    if step_dirs(folder):
        raise SFTError(f"run folder {folder} already holds a run with checkpoints: pass run.resume=true to "
                       "continue it (same settings), run.overwrite=true to replace it, or choose another run.name")
    raise SFTError(f"run folder {folder} already holds a finished run (final/, no checkpoint to resume "
                   "from): pass run.overwrite=true to replace it, or choose another run.name")


class RunFolder:
    """A run's hold on its folder (see the module docstring); a context manager around the run:
    an exception (or a stop signal) leaving the block puts back what was there if this run has
    saved nothing; the lock is released either way. Under torchrun only rank 0 holds it."""

    def __init__(self, path: Path, owner: bool):
        self.path, self.owner = Path(path), owner
        self.previous: Path | None = None   # the earlier contents, moved aside
        self.made: list[Path] = []          # folders this run created
        self.cleared = False                # the folder holds only what this run writes (a new run)
        self.saved_something = False

    @classmethod
    def open(cls, path: Path, resume: bool, overwrite: bool, resumed: bool,
             log: Callable[[str], None] = print) -> "RunFolder":
        """Lock the folder and clear it for this run (rank 0); every rank gets a RunFolder."""
        run = cls(path, owner=D.rank() == 0)
        error = None
        if run.owner:
            try:
                run._open(resume, overwrite, resumed, log)
            except SFTError as e:
                error = str(e)
        if D.world_size() > 1:  # the others would wait forever: every rank raises rank 0's error
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise SFTError(error)
        return run

    def _open(self, resume: bool, overwrite: bool, resumed: bool, log: Callable[[str], None]) -> None:
        previous = self.path.parent / f"{self.path.name}.previous"
        with uninterrupted():
            self.made = _make_dirs(self.path)
            try:
                take_lock(self.path, log)  # first: "in use by process N" is the true reason, if it is one
            except BaseException:
                self._remove_made()
                raise
            try:
                refuse_replacing(self.path, resume, overwrite, resumed)
                if not resumed and holds_run(previous):
                    raise SFTError(f"{previous} holds the run that an earlier run.overwrite=true replaced, kept "
                                   f"because its replacement did not finish: move it back to {self.path} or delete "
                                   "it, then start again")
                if not resumed:
                    self._move_aside(previous, log)
                    self.cleared = True
            except BaseException:
                self.close(failed=True)
                raise

    def _move_aside(self, previous: Path, log: Callable[[str], None]) -> None:
        children = [c for c in self.path.iterdir() if c.name != LOCK]
        if not children:
            return
        try:
            remove_folder(previous)
            previous.mkdir()
            for child in children:
                os.replace(child, previous / child.name)
        except OSError as e:
            for child in previous.iterdir() if previous.is_dir() else []:  # undo: all of it stays where it was
                os.replace(child, self.path / child.name)
            raise SFTError(f"{previous}: cannot move the earlier run aside ({e.strerror})") from None
        self.previous = previous
        if holds_run(previous):
            log(f"the earlier run in {self.path} is kept in {previous} until this one finishes")

    def saved(self) -> None:
        """This run wrote a checkpoint: from now on a failure keeps its files."""
        self.saved_something = True

    def finish(self) -> None:
        """final/ is written: the run this one replaced (moved aside by this start or by the start
        of the run it resumed) is not needed any more."""
        self.saved_something = True
        previous = self.path.parent / f"{self.path.name}.previous"
        if self.owner and previous.exists():
            remove_folder(previous)
        self.previous = None

    def close(self, failed: bool) -> None:
        if not self.owner:
            return
        with uninterrupted():
            if failed and self.cleared and not self.saved_something:
                self._put_back()
            elif failed and self.previous is not None and holds_run(self.previous):
                print(f"note: the earlier run is kept in {self.previous}")
            release_lock(self.path)
            if failed and not self.saved_something:
                self._remove_made()

    def _remove_made(self) -> None:
        """The folders this run created, deepest first, where nothing else was put in them."""
        for folder in reversed(self.made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def _put_back(self) -> None:
        """Remove what this run wrote and move the earlier contents back."""
        for child in self.path.iterdir() if self.path.is_dir() else []:
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if self.previous is not None:
            for child in self.previous.iterdir():
                os.replace(child, self.path / child.name)
            self.previous.rmdir()
            self.previous = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(failed=kind is not None)
