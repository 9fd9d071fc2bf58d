"""Errors a user can cause, and how they end the process: one line, no traceback.

    raise UserError("data.path='data/x' holds no prepared dataset: ...", all_ranks=True)

`peer-train` catches UserError at the top, prints `peer-train: <message>` once and exits with
status 2; a traceback only with PEER_DEBUG=1. `all_ranks=True` says every rank raised the same
error (it came from a collective decision), so only rank 0 prints it; otherwise the rank that
found it prints it.
"""

from __future__ import annotations

import os


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
