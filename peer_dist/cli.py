"""Command-line parsing shared by every tool: a bad flag is one line, and numbers have bounds.

    p = cli.Parser(prog="peer-bench layer")
    p.add_argument("--threads", type=cli.ints(1, cli.MAX_THREADS), default=2)

A bad value ends the process with `peer-bench layer: argument --threads: 0 is invalid:
allowed is an integer from 1 to 1024` on stderr and status 2 (argparse's usage block is left
out: `--help` shows it). Each bound is checked when the flag is read, before any work starts.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys
from typing import NoReturn

MAX_THREADS = 1024   # torch threads in one process: beyond any machine this runs on
MAX_COUNT = 1 << 40  # steps, tokens, repeats: a bound that only catches typos and overflow


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse makes subparsers of the same class)."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def fail(message: str) -> NoReturn:
    """End the process for a user error found after parsing: the one line, status 2."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def _allowed(lo, hi, kind: str) -> str:
    if hi is None:
        return f"allowed is {'an integer' if kind == 'int' else 'a number'} >= {lo}"
    if lo is None:
        return f"allowed is {'an integer' if kind == 'int' else 'a number'} <= {hi}"
    return f"allowed is {'an integer' if kind == 'int' else 'a number'} from {lo} to {hi}"


def _whole(text: str) -> int | None:
    """A whole number written as a float (1e12, 2.0), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None


def ints(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (None: unbounded on that side)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = _whole(text)  # 1e12, as the config's integers are read
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: {_allowed(lo, hi, 'int')}")
        return value
    parse.__name__ = "integer"
    return parse


def floats(lo: float | None = None, hi: float | None = None, *, above: bool = False):
    """An argparse type: a finite number in [lo, hi]; above=True makes the lower bound strict
    (a number > lo)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = lo is None or (value > lo if above else value >= lo)
        if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
            if above and hi is None:
                allowed = f"allowed is a number > {lo}"
            elif above:
                allowed = f"allowed is a number > {lo} and <= {hi}"
            else:
                allowed = _allowed(lo, hi, "float")
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: {allowed}")
        return value
    parse.__name__ = "number"
    return parse


def items(text: str) -> list[str] | None:
    """The comma-separated items of a list flag, stripped; None when there is none or one is
    empty (`64,,64`, `1,2,`: a typo, not a shorter list)."""
    out = [v.strip() for v in text.split(",")]
    return out if all(out) else None


def int_list(lo: int | None = None, hi: int | None = None):
    """An argparse type: a comma-separated list of integers in [lo, hi], at least one."""
    one = ints(lo, hi)

    def parse(text: str) -> list[int]:
        values = items(text)
        if not values:
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid: {_allowed(lo, hi, 'int')}, comma-separated")
        try:
            return [one(v) for v in values]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid: {_allowed(lo, hi, 'int')}, comma-separated") from None
    parse.__name__ = "integer list"
    return parse


def names(choices):
    """An argparse type: comma-separated names, each one of choices (repeats dropped), at
    least one."""
    def parse(text: str) -> list[str]:
        values = items(text)
        if not values or any(n not in choices for n in values):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed are any of "
                                             f"{', '.join(choices)}, comma-separated")
        return list(dict.fromkeys(values))
    parse.__name__ = "name list"
    return parse


COUNT = ints(1, MAX_COUNT)


def plural(n: int, word: str) -> str:
    """"1 rank", "2 ranks"."""
    return f"{n} {word}{'s' * (n != 1)}"  # a size or count >= 1 (steps, tokens, dims)


def own_override(overrides: list[str], keys) -> tuple[str, str] | None:
    """(override, key) of the first dotted override setting one of `keys`, the keys a tool
    sets itself for the runs it starts (a user's value would be lost or break them)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in keys:
            return item, key
    return None


# --------------------------------------------------------------------------- console scripts

TOOLS = {"peer-train": "peer_dist.train.__main__", "peer-prepare": "peer_dist.tools.prepare",
         "peer-bench": "peer_dist.tools.bench", "peer-scale": "peer_dist.tools.scale",
         "peer-launch": "peer_dist.tools.cluster", "peer-study": "peer_dist.tools.study",
         "peer-chaos": "peer_dist.tools.chaos", "peer-sample": "peer_dist.tools.sample",
         "peer-export": "peer_dist.tools.export"}


def run(prog: str) -> NoReturn:
    """The console script `prog`: its module's main() (imported here, so this module stays
    light), and a Ctrl-C the tool does not handle itself (while torch is imported, while data
    is read) ends in one line and status 130 instead of a KeyboardInterrupt traceback. Tools
    that write files write them whole or not at all, so a stop leaves no half-written one."""
    try:
        code = importlib.import_module(TOOLS[prog]).main()
    except KeyboardInterrupt:
        print(f"{prog}: stopped by SIGINT (Ctrl-C)", file=sys.stderr, flush=True)
        code = 130
    raise SystemExit(code)


# the console scripts of pyproject.toml
peer_train = functools.partial(run, "peer-train")
peer_prepare = functools.partial(run, "peer-prepare")
peer_bench = functools.partial(run, "peer-bench")
peer_scale = functools.partial(run, "peer-scale")
peer_launch = functools.partial(run, "peer-launch")
peer_study = functools.partial(run, "peer-study")
peer_chaos = functools.partial(run, "peer-chaos")
peer_sample = functools.partial(run, "peer-sample")
peer_export = functools.partial(run, "peer-export")
