"""One exception type for mistakes in what the user gave us.

`SFTError` marks an error the user can fix (a malformed JSON line, a config typo, a truncated
checkpoint). Its message names the file and the line, record or key, and says what to do.
The command-line tools (model/cli.py) print it on one line and exit with status 2, without a
traceback (unless `--debug`); any other exception is a bug in this project and keeps its
traceback.
"""
from __future__ import annotations


class SFTError(ValueError):
    """A user-facing error about bad input; the message names the file and the line or key."""
