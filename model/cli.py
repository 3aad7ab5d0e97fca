"""The one `main()` wrapper every command shares: a user's mistake is one line, not a traceback.

    status = run_cli(lambda: do_the_work(args), debug=args.debug)

An SFTError (bad input the user can fix, model/errors.py) becomes `error: <message>` on stderr
and exit status 2; `--debug` re-raises it with its traceback. Any other exception is a bug in
this project and keeps its traceback, so it can be reported. `ArgParser` makes a bad flag value
the same one line (argparse's own error prints the whole usage block first).

Under torchrun every process runs the same command on the same inputs, so a bad input fails in
all of them at once with the same message: only rank 0 (torchrun's RANK) prints it.

Stopping. Ctrl-C (SIGINT) and SIGTERM (sent by `kill`, by a batch scheduler that preempts the
job, and by torchrun to every process of a group when one of them fails or when torchrun itself
is stopped) both raise `Interrupted` where the program is, like Ctrl-C's KeyboardInterrupt:
nothing is lost by stopping at any point, because every output is written to a temporary name
and renamed when complete (model/files.py), and the few renames that must happen together run
inside `uninterrupted()`, which holds a signal back until they are done. The command ends with
one line (`stopped: SIGINT at step 12 of 40; ...`: the training loop adds where it was and what
is on disk) and the shell's status for a signal, 128 + its number: 130 for SIGINT, 143 for
SIGTERM. Code that handles the stop itself may catch it (`eval.py chat`: Ctrl-C ends a reply).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from typing import Callable, Iterator

from model.errors import SFTError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal (see the module docstring); `note` says what the interrupted work left."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = signum, ""

    @property
    def status(self) -> int:
        return 128 + self.signum


_deferred: dict = {"depth": 0, "pending": None}


def _on_signal(signum: int, frame) -> None:
    if _deferred["depth"]:
        _deferred["pending"] = _deferred["pending"] or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A stop signal that arrives inside the block takes effect when the block ends."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        pending = _deferred["pending"] if not _deferred["depth"] else None
        if pending:
            _deferred["pending"] = None
            _on_signal(pending, None)


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK), else True: the process that speaks for the group."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(command: Callable[[], object], debug: bool = False, prog: str = "") -> int:
    """A command's exit status: its own int, else 0; an SFTError is status 2, a stop signal
    128 + its number (see above). `prog` prefixes the error line (`eval.py: error: ...`)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        status = command()
        return status if isinstance(status, int) else 0
    except SFTError as e:
        if debug:
            raise
        if is_main_process():
            print(f"{prog + ': ' if prog else ''}error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if is_main_process():
            print(f"stopped: {e}{' ' + e.note if e.note else ''}", file=sys.stderr)
        return e.status
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def number(kind: type, minimum: float | None = None, maximum: float | None = None):
    """argparse type: an int or float within [minimum, maximum] (nan refused), so that a bad
    value is the one line `--limit 0: must be >= 1` instead of a traceback deep inside."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if minimum is not None and not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {minimum}")
        if maximum is not None and not value <= maximum:
            raise argparse.ArgumentTypeError(f"{text}: must be <= {maximum}")
        return value
    return parse


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors: `--limit 0: must be >= 1` raised as an SFTError."""

    def error(self, message: str):
        m = re.match(r"argument (\S+?): invalid choice: (.*?) \((choose from .*)\)$", message)
        if m:
            raise SFTError(f"{m.group(1)} {m.group(2)}: not a valid choice ({m.group(3)})")
        m = re.match(r"argument (\S+?): (.*)$", message)
        raise SFTError(f"{m.group(1)} {m.group(2)}" if m else message)
