"""peer-prepare: turn local text files or folders into token shards for training.

    peer-prepare stdlib --out data/stdlib                 # this Python's own library, offline
    peer-prepare notes/ book.txt --out data/mine --tokenizer tok.json --val-fraction 0.05

What it reads and writes: peer_dist/data/prepare.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from peer_dist import cli
from peer_dist.config import DataConfig
from peer_dist.data.prepare import prepare
from peer_dist.errors import folder_error


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="peer-prepare", description=__doc__.split("\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files, folders, or 'stdlib'")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--tokenizer", default="byte", help="byte (default) or a tokenizers .json")
    defaults = DataConfig()
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help=f"share of bytes held out (default {defaults.val_fraction})")
    p.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                   help=f"cap on raw text read (default {defaults.max_bytes:,})")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    problem = "it is empty" if not args.out.strip() else folder_error(Path(args.out).parent)
    if problem:
        print(f"peer-prepare: error: --out={args.out!r} is invalid: {problem}; allowed is a "
              "new folder whose parent can be made and written", file=sys.stderr)
        return 2
    try:
        meta = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.max_bytes,
                       args.force)
    except (ValueError, OSError, ImportError) as e:
        print(f"peer-prepare: error: {e}", file=sys.stderr)
        return 2
    t = meta["tokens"]
    print(f"peer-prepare: wrote {args.out}: {t['train']:,} train + {t['val']:,} val tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}), {sum(meta['documents'].values())} "
          f"documents, {len(meta['skipped'])} skipped, {time.perf_counter() - t0:.1f} s")
    print(f"peer-prepare: {held_out_note(meta)}")
    return 0


def held_out_note(meta: dict) -> str:
    """The share of the bytes held out, against what was asked (they differ when files were
    skipped as not text, or the text is tiny)."""
    b = meta["bytes"]
    share = b["val"] / max(1, b["train"] + b["val"])
    asked = meta["val_fraction"]
    note = f"validation holds {share:.2%} of the bytes (asked {asked:.2%})"
    if abs(share - asked) > 0.1 * asked:
        note += ": it differs because files were skipped as not text or the text is tiny"
    return note


if __name__ == "__main__":
    sys.exit(main())
