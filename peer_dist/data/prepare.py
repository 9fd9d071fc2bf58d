"""Turn local text files or folders into token shards for training (`peer-prepare` is its
command line, peer_dist/tools/prepare.py).

Inputs are files, folders (read recursively) or "stdlib" (the standard library of the Python
that runs this: its *.py sources and the *.txt / *.rst / *.md text next to them; this includes
pydoc_data/topics.py, the language reference as text). Everything is read in sorted order, so
the same inputs give the same shards. Files that are not UTF-8 text (or contain NUL) are skipped.

Whole documents go to train or to validation: in the order of a hash of their names, each
document that still fits is moved to validation, and the gap left to val_fraction of the bytes is
filled by cutting one more document in two (train head, validation tail), so the held-out share
is what was asked whether there are 3 files or 30,000. The output folder (see
peer_dist/data/dataset.py) is written under a temporary name and renamed when complete, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peer_dist.config import DataConfig
from peer_dist.data.dataset import HF_TOKENIZER_FILE, META_FILE, SPLITS, token_dtype
from peer_dist.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from peer_dist.errors import folder_error

STDLIB = "stdlib"
STDLIB_SUFFIXES = (".py", ".txt", ".rst", ".md")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
ENCODE_CHUNK_BYTES = 4 << 20  # text handed to the tokenizer at once (batching helps HF)
Log = Callable[[str], None]


@dataclass
class Doc:
    name: str  # stable name: "stdlib/<relative path>" or the path under the input as given
    path: Path
    size: int  # bytes to read (the last document may be cut to respect max_bytes)
    split: str = "train"
    part: str = "all"  # all | head | tail (a document cut into train head / val tail)
    val_share: float = 0.0  # head / tail: the share of the document's text in the tail


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- finding files

def _walk(root: Path, suffixes: tuple[str, ...] | None) -> Iterator[Path]:
    """Regular files under root in sorted order, skipping hidden entries and caches."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or p.is_symlink() or not p.is_file():
                continue
            if suffixes is None or p.suffix in suffixes:
                yield p


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(inputs: list[str], log: Log | None = None) -> list[tuple[str, Path]]:
    """(name, path) for every input file, in input order then sorted path order; a file named
    twice (the same input given again, a file and the folder holding it) is read once, where
    it is first named."""
    out: list[tuple[str, Path]] = []
    for item in inputs:
        if item == "":  # Path("") is the current folder: everything under it would be read
            raise ValueError("input '' is empty: allowed are files, folders or 'stdlib'")
        if item == STDLIB:
            root = stdlib_root()
            out += [(f"stdlib/{p.relative_to(root).as_posix()}", p)
                    for p in _walk(root, STDLIB_SUFFIXES)]
            continue
        path = Path(item)
        if path.is_file():
            out.append((path.as_posix(), path))
        elif path.is_dir():
            out += [((path / p.relative_to(path)).as_posix(), p) for p in _walk(path, None)]
        elif path.exists():  # /dev/null, a pipe, a socket
            raise ValueError(f"input {item!r} is not a file or a folder (a device or a pipe): "
                             f"allowed are files, folders or {STDLIB!r}")
        else:
            raise FileNotFoundError(f"input {item!r} does not exist: allowed are files, folders "
                                    f"or {STDLIB!r}")
    seen: set[Path] = set()
    once = []
    for name, path in out:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            once.append((name, path))
    if log and len(once) < len(out):
        log(f"peer-prepare: {len(out) - len(once)} files named more than once are read once")
    return once


def plan_documents(files: list[tuple[str, Path]], max_bytes: int,
                   val_fraction: float) -> list[Doc]:
    """Cap the corpus at max_bytes (by file size) and choose the validation documents."""
    docs: list[Doc] = []
    total = 0
    for name, path in files:
        size = min(path.stat().st_size, max_bytes - total)
        if size > 0:
            docs.append(Doc(name, path, size))
            total += size
        if total >= max_bytes:
            break
    if not docs:
        raise ValueError("no input text found (all inputs empty): give files with text")
    need = math.ceil(1 / val_fraction)
    need += val_fraction * need < 1  # the fewest bytes whose share val_fraction is 1 byte
    if total < need:
        held = sum(path.stat().st_size for _, path in files)
        raise ValueError(
            f"max_bytes={max_bytes:,} and inputs of {held:,} bytes give {total:,} bytes of text: "
            f"val_fraction={val_fraction} of it is less than the 1 byte validation needs; "
            f"allowed is at least {need:,} bytes (1 / val_fraction): "
            + ("a larger max_bytes" if held >= need else "more text") + " or a larger "
            "val_fraction")
    return _choose_val(docs, val_fraction * total)


def _choose_val(docs: list[Doc], target: float) -> list[Doc]:
    """Move every document that still fits to val, in name-hash order, then cut one train
    document in two so that val holds `target` bytes; returns the documents in stream order."""
    val_bytes = 0
    for d in sorted(docs, key=lambda d: hashlib.sha1(d.name.encode()).hexdigest()):
        if val_bytes + d.size <= target and len(docs) > 1:
            d.split = "val"
            val_bytes += d.size
    gap = target - val_bytes
    cut = next((d for d in sorted(docs, key=lambda d: d.size)
                if d.split == "train" and d.size > gap), None)
    if cut is None or gap < max(1.0, 0.001 * target):  # close enough: no document cut
        return docs
    cut.part, cut.val_share = "head", gap / cut.size
    tail = Doc(cut.name, cut.path, cut.size, "val", "tail", cut.val_share)
    i = docs.index(cut)
    return docs[:i + 1] + [tail] + docs[i + 1:]


# --------------------------------------------------------------------------- reading text

def read_text(doc: Doc) -> str | None:
    """The document's text, or None when it is not UTF-8 text."""
    with open(doc.path, "rb") as f:
        raw = f.read(doc.size)
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # A cut at max_bytes may split one multi-byte character: drop only that tail.
        if e.start < len(raw) - 3 or doc.size == doc.path.stat().st_size:
            return None
        text = raw[:e.start].decode("utf-8")
    if doc.part == "all":
        return text
    # Cut by bytes (the share was planned in bytes), back to the start of a character.
    data = text.encode("utf-8")
    cut = int(len(data) * (1.0 - doc.val_share))
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return (data[:cut] if doc.part == "head" else data[cut:]).decode("utf-8")


# --------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Appends encoded documents to train.bin / val.bin and counts what went where."""

    def __init__(self, folder: Path, tok: ByteTokenizer | HFTokenizer):
        self.tok = tok
        self.dtype = token_dtype(tok.vocab_size)
        self.files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)
        self.docs = dict.fromkeys(SPLITS, 0)
        self._pending: list[tuple[str, str]] = []  # (split, text) awaiting encoding
        self._pending_bytes = 0

    def add(self, split: str, text: str) -> None:
        self._pending.append((split, text))
        self._pending_bytes += len(text)
        if self._pending_bytes >= ENCODE_CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        encoded = self.tok.encode_batch([t for _, t in self._pending])
        eos = [] if self.tok.eos_id is None else [self.tok.eos_id]
        for (split, text), ids in zip(self._pending, encoded, strict=True):
            arr = np.concatenate([np.asarray(ids, dtype=np.int64), eos]).astype(self.dtype)
            arr.tofile(self.files[split])
            self.tokens[split] += len(arr)
            self.bytes[split] += len(text.encode("utf-8"))
            self.docs[split] += 1
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()


def _write(folder: Path, docs: list[Doc], tok: ByteTokenizer | HFTokenizer,
           log: Log) -> tuple[ShardWriter, list[str]]:
    writer = ShardWriter(folder, tok)
    skipped: list[str] = []
    planned = sum(d.size for d in docs if d.part != "tail")
    done, t0, last = 0, time.perf_counter(), 0.0
    try:
        for i, doc in enumerate(docs):
            text = read_text(doc)
            if text is None:
                if doc.part != "tail":  # a cut document is named once
                    skipped.append(doc.name)
            elif text:
                writer.add(doc.split, text)
            done += doc.size if doc.part != "tail" else 0
            now = time.perf_counter() - t0
            if now - last >= 2.0 or i == len(docs) - 1:
                last = now
                log(f"peer-prepare: {i + 1}/{len(docs)} files, {done / 1e6:.1f}/"
                    f"{planned / 1e6:.1f} MB read, {now:.1f} s")
    finally:
        writer.close()
    return writer, skipped


def prepare(inputs: list[str], out: str | Path, tokenizer: str = "byte",
            val_fraction: float = 0.01, max_bytes: int = 50_000_000, force: bool = False,
            log: Log = _log_stderr) -> dict:
    """Write out/{train,val}.bin and out/meta.json from the inputs; return the metadata."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid: allowed is a fraction in (0, 1)")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} is invalid: allowed is > 0")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output folder {str(out)!r} exists: remove it or pass --force")
    if out.exists():
        _check_replaceable(out, inputs)
    problem = folder_error(out.parent)
    if problem:
        raise ValueError(f"output folder {str(out)!r} is invalid: {problem}; allowed is a path "
                         "whose folder can be made and written")
    files = list_files(inputs, log)
    own = out.resolve()  # an earlier output inside an input folder is not text to learn from
    kept = [(n, p) for n, p in files if own != p.resolve() and own not in p.resolve().parents]
    if len(kept) < len(files):
        log(f"peer-prepare: {len(files) - len(kept)} files under --out {str(out)!r} (an "
            "earlier output) are not read")
    files = kept
    tok = load_tokenizer(tokenizer)
    docs = plan_documents(files, max_bytes, val_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer, skipped = _write(tmp, docs, tok, log)
        if writer.tokens["train"] == 0 or writer.tokens["val"] == 0:
            read = sum(d.size for d in docs if d.part != "tail")
            raise ValueError(f"inputs {inputs} gave {writer.tokens} tokens from {read:,} bytes "
                             f"({len(skipped)} files skipped as not UTF-8 text): both splits "
                             f"need text; allowed is more UTF-8 text, or a larger max_bytes "
                             f"(now {max_bytes:,})")
        meta = _meta(inputs, tokenizer, tok, writer, docs, skipped, val_fraction, max_bytes)
        if isinstance(tok, HFTokenizer):
            shutil.copyfile(tok.path, tmp / HF_TOKENIZER_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_replaceable(out: Path, inputs: list[str]) -> None:
    """--force replaces an earlier dataset, or an empty folder: never a file, another folder's
    contents, or the inputs themselves."""
    resolved = out.resolve()
    inside = [i for i in inputs
              if Path(i).resolve() == resolved or resolved in Path(i).resolve().parents]
    if inside:
        raise FileExistsError(f"--out {str(out)!r} holds the input {inside[0]!r}: --force would "
                              "delete it; allowed: an --out apart from the inputs")
    if out.is_dir() and ((out / META_FILE).is_file() or not any(out.iterdir())):
        return
    raise FileExistsError(f"--out {str(out)!r} exists and is not a dataset written by "
                          f"peer-prepare (no {META_FILE}): --force replaces only such a folder "
                          "or an empty one; allowed: a new path, or remove it yourself")


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (only with force) is moved aside first."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _meta(inputs: list[str], spec: str, tok: ByteTokenizer | HFTokenizer, writer: ShardWriter,
          docs: list[Doc], skipped: list[str], val_fraction: float, max_bytes: int) -> dict:
    skip = set(skipped)
    return {
        "format": "peer_dist.tokens/1",
        "vocab_size": tok.vocab_size,
        "dtype": writer.dtype.name,
        "eos_id": tok.eos_id,
        "tokenizer": "byte" if spec == "byte" else HF_TOKENIZER_FILE,
        "tokenizer_source": spec,
        "sources": list(inputs),
        "source_paths": [source_key(i) for i in inputs],  # as read: what prepared_mismatch checks
        "max_bytes": max_bytes,
        "val_fraction": val_fraction,
        "tokens": writer.tokens,
        "bytes": writer.bytes,
        "documents": writer.docs,
        "skipped": skipped,
        # Every document in stream order per split: [name, split, part].
        "files": [[d.name, d.split, d.part] for d in docs if d.name not in skip],
    }


def source_key(source: str) -> str:
    """An input as it is read, whatever folder it was named from: 'stdlib' or an absolute path."""
    return source if source == STDLIB else str(Path(source).resolve())


def _sources(data_cfg: DataConfig) -> list[str]:
    return [s.strip() for s in str(data_cfg.source).split(",") if s.strip()]


def prepared_mismatch(data_cfg: DataConfig) -> str | None:
    """Why the folder prepared at data_cfg.path is not what data.source, data.tokenizer,
    data.val_fraction and data.max_bytes would prepare (None: it is, or data.source is empty,
    which means "the folder as it is"). Without this check, changing data.source while data.path
    still names an earlier dataset trains on the earlier dataset."""
    sources = _sources(data_cfg)
    if not sources:
        return None
    path = Path(data_cfg.path)
    meta = json.loads((path / META_FILE).read_text())
    had = meta.get("source_paths") or [source_key(s) for s in meta.get("sources", [])]
    differ = []
    if had and sorted(map(source_key, sources)) != sorted(had):  # none recorded: not known
        differ.append(f"data.source={data_cfg.source!r} (it holds {meta.get('sources')})")
    tok = meta.get("tokenizer", "byte")
    if data_cfg.tokenizer == "byte" or tok == "byte":
        same_tok = data_cfg.tokenizer == "byte" and tok == "byte"
    else:
        try:
            same_tok = Path(data_cfg.tokenizer).read_bytes() == (path / tok).read_bytes()
        except OSError:
            same_tok = False
    if not same_tok:
        differ.append(f"data.tokenizer={data_cfg.tokenizer!r} (it holds "
                      f"{meta.get('tokenizer_source', tok)!r})")
    for key in ("val_fraction", "max_bytes"):
        if key in meta and getattr(data_cfg, key) != meta[key]:
            differ.append(f"data.{key}={getattr(data_cfg, key)!r} (it holds {meta[key]!r})")
    if not differ:
        return None
    return (f"data.path={str(path)!r} was prepared from other settings than "
            f"{', '.join(differ)}: allowed are the settings it was prepared with, a new "
            "data.path to prepare these there, or data.source= (empty) to train on the folder "
            "as it is")


def prepare_dataset(data_cfg: DataConfig, log: Log = print) -> Path:
    """Create data_cfg.path from data_cfg.source if it has no meta.json yet; return the path.

    Call this on rank 0 only, then barrier before any rank opens the folder:

        if rank == 0:
            prepare_dataset(cfg.data)
        dist.barrier()
        data = TokenDataset(cfg.data.path)

    Without a shared filesystem, call it on each node's local rank 0 and barrier the same way.
    The folder appears whole or not at all (written to a temporary name, then renamed), so a
    crashed preparation is simply redone on the next start.
    """
    path = Path(data_cfg.path)
    if (path / META_FILE).is_file():
        return path
    sources = _sources(data_cfg)
    if not sources:
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist and data.source is "
                                "empty: allowed are a prepared folder, or a source to prepare")
    prepare(sources, path, tokenizer=data_cfg.tokenizer, val_fraction=data_cfg.val_fraction,
            max_bytes=data_cfg.max_bytes, log=log)
    return path
