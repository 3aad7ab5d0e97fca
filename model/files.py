"""Reading the user's files and writing ours without ever leaving half a file behind.

This is the bottom layer every tool shares (it imports nothing of the project but SFTError).

Reading. A path the user named can be a directory, a FIFO (opening one blocks forever), missing,
unreadable, UTF-16 from Windows or latin-1 from an old export. Each case becomes one SFTError
naming the file and the line, instead of a UnicodeDecodeError from deep inside a parser.
JSONL is read as a stream, one line at a time, so a million-line file never sits in memory
whole; every error names `path:LINE`. A file that a run appends to (a cache, a log) can end in
a line torn by a kill: `resumable=True` skips a torn *last* line, and only that one.

Writing. `open()` + `write()` on the real name means a crash, a kill or a full disk in the
middle leaves a truncated file where a good one was. Instead everything is written to a
temporary name in the same folder and renamed over the target when complete: a rename within
one filesystem is atomic, so a reader sees the old file or the new one, never a mix.

    atomic_write(path, data)     one file, bytes or text
    atomic_file(path)            the same, as a context manager for streamed writes (tensors)
    append_jsonl(path, row)      one line added to a file a run resumes from (a torn last line,
                                 left by a kill, is cut off first)
    write_folder(path)           a whole folder: yields a temporary sibling; on success the old
                                 folder is moved aside, the new one renamed in, the old deleted;
                                 if the swap fails the old folder is put back
    remove_folder(path)          renamed to a hidden name first, so a half-deleted folder never
                                 looks complete

Temporary files get the permissions of an ordinary new file (0666 minus the umask, like
`open()`), not mkstemp's private 0600, so a run folder on a shared filesystem stays readable by
the other nodes and users. A full disk or a permission error becomes an SFTError naming the path.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from model.errors import SFTError

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- reading


def _check_readable(path: Path, what: str) -> None:
    if path.is_dir():
        raise SFTError(f"{path}: is a directory, not a {what}")
    if path.exists() and not path.is_file():
        raise SFTError(f"{path}: not a regular file (a FIFO or a device?); pass a {what}")


def _decode(data: bytes, path: Path, line: int, first: bool) -> str:
    """One chunk of a file as text; `first`: the file's first bytes (BOM checks)."""
    if first and data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SFTError(f"{path}:1: UTF-16 text (byte-order mark); re-save the file as UTF-8")
    try:
        return data.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        raise SFTError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 (latin-1 or cp1252?); "
                       "re-save the file as UTF-8") from None


@contextlib.contextmanager
def _open_for_reading(path: Path, what: str) -> Iterator[BinaryIO]:
    _check_readable(path, what)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SFTError(f"{path}: {what} not found") from None
    except OSError as e:
        raise SFTError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        yield f


def read_bytes(path: PathLike, what: str = "file") -> bytes:
    """The bytes of a user's file, or an SFTError (missing, a directory, unreadable)."""
    path = Path(path)
    with _open_for_reading(path, what) as f:
        return f.read()


def read_text(path: PathLike, what: str = "file") -> str:
    """The UTF-8 text of a user's file (a UTF-8 byte-order mark is dropped), or an SFTError."""
    path = Path(path)
    return _decode(read_bytes(path, what), path, 1, first=True)


_REQUIRED = object()


def read_json(path: PathLike, what: str = "JSON file", default: Any = _REQUIRED) -> Any:
    """A whole JSON document; invalid JSON names the file, line and column. `default`: what an
    optional file that does not exist reads as (e.g. {} for generation_config.json)."""
    path = Path(path)
    if default is not _REQUIRED and not path.exists():
        return default
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise SFTError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def first_char(path: PathLike, what: str = "file") -> str:
    """The first non-blank character of a text file ('' if none): tells a JSON list ('[') from
    JSONL ('{') without reading the whole file."""
    path = Path(path)
    with _open_for_reading(path, what) as f:
        head = f.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            _decode(head, path, 1, first=True)  # raises: UTF-16
        head = head.removeprefix(b"\xef\xbb\xbf")
        while True:
            stripped = head.lstrip()
            if stripped:
                return chr(stripped[0])  # only compared with '[' / '{'
            head = f.read(1 << 16)
            if not head:
                return ""


def iter_jsonl(path: PathLike, what: str = "JSONL file", resumable: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, read as a stream.

    A line that is not JSON, or not a JSON object, is an SFTError `path:LINE: ...`.
    resumable=True: a file this project appends to; an unparseable *last* line is a write torn
    by a kill and is skipped (the work it stood for is simply done again).
    """
    path = Path(path)
    with _open_for_reading(path, what) as f:
        pending: tuple[int, str, json.JSONDecodeError] | None = None
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno, first=lineno == 1)
            if pending is not None:  # a bad line with more after it: not a torn tail
                raise SFTError(f"{path}:{pending[0]}: not valid JSON ({pending[2].msg})")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if resumable:
                    pending = (lineno, line, e)
                    continue
                raise SFTError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise SFTError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def read_jsonl(path: PathLike, what: str = "JSONL file", resumable: bool = False) -> list[dict]:
    """Every object of a JSONL file (see iter_jsonl); resumable: a missing file is []."""
    if resumable and not Path(path).exists():
        return []
    return [rec for _, rec in iter_jsonl(path, what, resumable)]


# ----------------------------------------------------------------------------- writing


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _os_error(path: Path, e: OSError) -> SFTError:
    return SFTError(f"{path}: cannot write ({e.strerror or e})")


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace `path` only when the block ends cleanly."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _os_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, InterruptedError)):
            raise _os_error(path, e) from None
        raise


def atomic_write(path: PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON with a final newline, written atomically."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _drop_torn_tail(f: BinaryIO) -> None:
    """Cut a last line that has no newline (a write torn by a kill) off a file open for r+b."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos = end
    while pos > 0:
        step = min(pos, 1 << 16)
        f.seek(pos - step)
        nl = f.read(step).rfind(b"\n")
        if nl >= 0:
            f.truncate(pos - step + nl + 1)
            return
        pos -= step
    f.truncate(0)


def append_jsonl(path: PathLike, row: dict) -> None:
    """Append one JSON line to a file a run resumes from (a cache, an output being built).

    A line torn by an earlier kill is cut off first, so a torn line can only ever be the last
    one, which `read_jsonl(..., resumable=True)` skips.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if path.exists() else "wb") as f:
            _drop_torn_tail(f)
            f.seek(0, os.SEEK_END)
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    except OSError as e:
        raise _os_error(path, e) from None


def _hidden(path: Path, tag: str) -> Path:
    return path.parent / f".{tag}-{path.name}"


def remove_folder(path: PathLike) -> None:
    """Delete a folder; it is renamed to `.trash-<name>` first, so a deletion cut short never
    leaves something that looks like a complete folder under the real name."""
    path = Path(path)
    if not path.exists():
        return
    trash = _hidden(path, "trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def write_folder(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling `.tmp-<name>/`; when the block ends cleanly it replaces
    `path` (the previous folder, if any, is restored if the swap fails). On any error the
    temporary folder is deleted (a full disk gets its space back) and `path` is untouched."""
    path = Path(path)
    tmp, old = _hidden(path, "tmp"), _hidden(path, "old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier write
        tmp.mkdir()
    except OSError as e:
        raise _os_error(tmp, e) from None
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the previous folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _os_error(path, e) from None
        raise
