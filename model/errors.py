"""One exception type for mistakes in what the user gave us, and the two places every tool meets it.

`SFTError` marks an error the user can fix (a malformed JSON line, a config typo, a truncated
checkpoint). Its message names the file and the line, record or key, and says what to do.
The command-line tools print it on one line and exit with status 2, without a traceback
(unless `--debug`); any other exception is a bug in this project and keeps its traceback.

`read_text` is how every tool reads a file the user named: a directory, a FIFO (opening one
would block forever), a missing or unreadable file, and bytes that are not UTF-8 (a latin-1
export, a UTF-16 file from Windows) all become an SFTError naming the file and the line,
instead of a UnicodeDecodeError from deep inside a parser. `run_cli` is the one `main()`
wrapper every command shares.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator


class SFTError(ValueError):
    """A user-facing error about bad input; the message names the file and the line or key."""


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of a user's file (a UTF-8 byte-order mark is dropped), or an SFTError."""
    path = Path(path)
    if path.is_dir():
        raise SFTError(f"{path}: is a directory, not a {what}")
    if path.exists() and not path.is_file():
        raise SFTError(f"{path}: not a regular file (a FIFO or a device?); pass a {what}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SFTError(f"{path}: {what} not found") from None
    except OSError as e:
        raise SFTError(f"{path}: cannot read ({e.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SFTError(f"{path} line 1: UTF-16 text (byte-order mark); re-save the file as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SFTError(f"{path} line {line}: byte 0x{data[e.start]:02x} is not UTF-8 (latin-1 or "
                       "cp1252?); re-save the file as UTF-8") from None


def read_jsonl_objects(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not valid
    JSON or not a JSON object is an SFTError naming the file and line."""
    path = Path(path)
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SFTError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise SFTError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def run_cli(command: Callable[[], object], debug: bool = False) -> int:
    """A command's exit status: its own int, else 0; an SFTError becomes `error: <message>` on
    stderr and status 2 (`--debug` re-raises it, traceback and all). Any other exception is a
    bug in this project and keeps its traceback."""
    try:
        status = command()
        return status if isinstance(status, int) else 0
    except SFTError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
