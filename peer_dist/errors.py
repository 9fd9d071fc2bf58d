"""Errors a user can cause, and how they end the process: one line, no traceback.

    raise UserError("data.path='data/x' holds no prepared dataset: ...", all_ranks=True)

`peer-train` catches UserError at the top, prints `peer-train: <message>` once and exits with
status 2; a traceback only with PEER_DEBUG=1. `all_ranks=True` says every rank raised the same
error (it came from a collective decision), so only rank 0 prints it; otherwise the rank that
found it prints it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """A bad value, file or environment the user can fix; the message names it and what is
    allowed."""

    exit_code = 2

    def __init__(self, message: str, *, all_ranks: bool = False, quiet: bool = False):
        super().__init__(message)
        self.all_ranks, self.quiet = all_ranks, quiet

    def should_print(self, rank: int) -> bool:
        """Rank 0 prints an error every rank raised; otherwise the rank that raised it, unless
        another rank was chosen to report it (quiet)."""
        return not self.quiet and (not self.all_ranks or rank == 0)


class JobFault(UserError):
    """Not the user's input but the job's state: a rank that hung or died. Status 1."""

    exit_code = 1


def debug() -> bool:
    """PEER_DEBUG=1: let errors end in their traceback."""
    return os.environ.get("PEER_DEBUG", "") not in ("", "0")


def folder_error(path: str | Path, make: bool = False) -> str | None:
    """Why the output folder `path` cannot be written, in words for a one-line error (the tool
    adds the flag and what is allowed); None when it can. make=True creates it (and its
    parents) now; make=False leaves the disk as it was, probing with a temporary folder in the
    nearest existing folder (a file in its place, /proc, a read-only folder are found here,
    before any work, not when the results are written)."""
    if isinstance(path, str) and not path.strip():  # Path("") would be the working folder
        return "it is empty"
    path = Path(path)
    near = next(q for q in (path, *path.parents) if q.exists() or q == Path(q.anchor))
    if near.exists() and not near.is_dir():
        return f"{str(near)!r} is a file"
    try:
        if make:
            path.mkdir(parents=True, exist_ok=True)
            near = path
        os.rmdir(tempfile.mkdtemp(prefix=".peer-probe-", dir=near))
    except OSError as e:
        return f"a folder cannot be made or written in {str(near)!r} ({e.strerror})"
    return None
