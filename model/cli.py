"""The one `main()` wrapper every command shares: a user's mistake is one line, not a traceback.

    status = run_cli(lambda: do_the_work(args), debug=args.debug)

An SFTError (bad input the user can fix, model/errors.py) becomes `error: <message>` on stderr
and exit status 2; `--debug` re-raises it with its traceback. Any other exception is a bug in
this project and keeps its traceback, so it can be reported. `ArgParser` makes a bad flag value
the same one line (argparse's own error prints the whole usage block first).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from model.errors import SFTError


def run_cli(command: Callable[[], object], debug: bool = False) -> int:
    """A command's exit status: its own int, else 0; an SFTError is status 2 (see above)."""
    try:
        status = command()
        return status if isinstance(status, int) else 0
    except SFTError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors: `--limit 0: must be >= 1` raised as an SFTError."""

    def error(self, message: str):
        m = re.match(r"argument (\S+?): invalid choice: (.*?) \((choose from .*)\)$", message)
        if m:
            raise SFTError(f"{m.group(1)} {m.group(2)}: not a valid choice ({m.group(3)})")
        m = re.match(r"argument (\S+?): (.*)$", message)
        raise SFTError(f"{m.group(1)} {m.group(2)}" if m else message)
