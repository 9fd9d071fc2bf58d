"""peer-export: a training checkpoint as one file another program can load.

    peer-export --checkpoint runs/tiny --out model.safetensors

writes model.safetensors (every weight of the single-process model: the sharded expert tables
gathered into whole N x D tensors, rows in expert-id order) and model.yaml beside it (the
resolved config that builds the model). The file is in the safetensors layout (an 8-byte header
length, a JSON header of names, dtypes, shapes and byte offsets, then the raw little-endian
bytes), written and read here without the `safetensors` package; that package and other
languages' readers load it too.

    cfg, model = load_exported("model.safetensors")   # Transformer, eval mode, on the CPU
    cfg, model = load_from_checkpoint(Path("runs/tiny/checkpoints/step_00000100"))

A checkpoint is given as its step directory, its checkpoints/ folder or the run directory (the
newest complete one is taken through `latest`); it is verified against its manifest first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import warnings
from pathlib import Path

import torch

from peer_dist import cli
from peer_dist.config import Config, ConfigError, load_config, save_config
from peer_dist.errors import UserError, folder_error

PROG = "peer-export"
FORMAT = "peer_dist.model/1"
# safetensors' dtype names
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


# --------------------------------------------------------------------------- the file format

def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str]) -> None:
    """Write `tensors` (any device, contiguous copies taken) in the safetensors layout."""
    header: dict[str, object] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in tensors.items():
        flat = t.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors too
        raw = flat.view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    tmp.replace(path)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated or damaged one is a UserError
    naming what is wrong (every offset and shape is checked before a byte is read)."""
    data = Path(path).read_bytes()

    def bad(what: str) -> UserError:
        return UserError(f"{str(path)!r} is not a whole safetensors file ({what}); allowed: a "
                         "file written by peer-export (export it again)")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, fewer than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise bad(f"its header claims {n:,} bytes of {len(data) - 8:,}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both
        raise bad(f"its header is not JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    base, size = 8 + n, len(data) - 8 - n
    out = {}
    for name, e in header.items():
        try:
            dtype, shape, (start, stop) = DTYPES[e["dtype"]], list(e["shape"]), e["data_offsets"]
            ok = (all(isinstance(v, int) and v >= 0 for v in (*shape, start, stop))
                  and start <= stop <= size
                  and math.prod(shape) * dtype.itemsize == stop - start)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name!r}: {json.dumps(e)[:120]} does not fit its {size:,} bytes "
                      "of data")
        buf = bytearray(data[base + start:base + stop])  # writable: torch shares it
        flat = (torch.frombuffer(buf, dtype=torch.uint8) if buf
                else torch.empty(0, dtype=torch.uint8))  # frombuffer refuses empty buffers
        out[name] = flat.view(dtype).reshape(shape)
    return out, metadata


# --------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(spec: str | Path) -> Path:
    """A step directory from a step directory, a checkpoints/ folder or a run directory."""
    from peer_dist.train.checkpoint import LATEST

    path = Path(spec)
    for folder in (path, path / "checkpoints"):
        if (folder / LATEST).is_file():
            return folder / (folder / LATEST).read_text().strip()
    if (path / "meta.json").is_file():
        return path
    raise UserError(f"--checkpoint={str(spec)!r} holds no checkpoint; allowed: a run directory, "
                    "its checkpoints/ folder, or one step_* directory in it")


def checkpoint_config(path: Path) -> Config:
    """The resolved config a checkpoint was written with."""
    try:
        return load_config(path / "config.yaml")
    except ConfigError as e:
        raise UserError(f"checkpoint {str(path)!r}: {e}") from None


def read_tables(path: Path) -> dict[str, torch.Tensor]:
    """The whole expert tables of a checkpoint ({shard name}.u / .v, rows by table position),
    read in one process; the optimizer state is not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path / "tables"))
    md = reader.read_metadata()
    tables = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in md.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and k.endswith((".u", ".v"))}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tables, storage_reader=reader, no_dist=True)
    return tables


def model_state(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """Every weight of the single-process model from checkpoint `path`: the dense state as
    saved, each table reordered from table positions to expert ids (balance_ids permutes)."""
    from peer_dist.parallel.idmap import IdMap

    state = dict(torch.load(path / "dense_full.pt", weights_only=True))
    n = cfg.model.peer.num_experts
    positions = IdMap(n, 1, cfg.parallel.balance_ids).position(torch.arange(n))
    for name, table in read_tables(path).items():
        state[name] = table[positions]  # (N, D): row e holds expert e
    return state


def build_loaded(cfg: Config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The single-process model holding `state` exactly (strict: every weight, nothing more)."""
    from peer_dist.model.transformer import build_model
    from peer_dist.train.checkpoint import without_unsaved_buffers

    model = build_model(cfg.model, cfg.train.seed, materialize=False)
    try:
        model.load_state_dict(without_unsaved_buffers(state, model), strict=True, assign=True)
    except RuntimeError as e:  # torch lists every mismatch, a line each: the first is named
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines[1:] if ln), lines[0] if lines else "")
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise UserError(f"the weights do not fit the model of their config: {first}{more}; "
                        "allowed: the config saved with them") from None
    return model.eval()


def load_from_checkpoint(spec: str | Path) -> tuple[Config, torch.nn.Module]:
    """(config, single-process model) of a verified checkpoint."""
    from peer_dist.train.checkpoint import verify

    path = resolve_checkpoint(spec)
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint {str(path)!r} {problem}; allowed: a complete checkpoint")
    cfg = checkpoint_config(path)
    return cfg, build_loaded(cfg, model_state(path, cfg))


def config_path(out: Path) -> Path:
    return out.with_suffix(".yaml")


def export(checkpoint: str | Path, out: str | Path) -> tuple[Path, dict]:
    """Write out (weights) and out with .yaml (config); returns (checkpoint path, summary)."""
    path = resolve_checkpoint(checkpoint)
    cfg, model = load_from_checkpoint(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    meta = {"format": FORMAT, "checkpoint": str(path),
            "step": str(json.loads((path / "meta.json").read_text())["step"]),
            "tokenizer": tokenizer_spec(cfg)}
    save_safetensors(out, state, meta)
    save_config(cfg, config_path(out))
    params = sum(t.numel() for t in state.values() if t.is_floating_point())
    return path, {"tensors": len(state), "params": params, "bytes": out.stat().st_size,
                  "step": int(meta["step"])}


def tokenizer_spec(cfg: Config) -> str:
    """The tokenizer the data was prepared with: 'byte', or the tokenizers JSON in data.path."""
    meta = Path(cfg.data.path) / "meta.json"
    try:
        spec = json.loads(meta.read_text())["tokenizer"]
    except (OSError, ValueError, KeyError):
        return cfg.data.tokenizer
    return "byte" if spec == "byte" else str(Path(cfg.data.path) / spec)


def load_exported(path: str | Path) -> tuple[Config, torch.nn.Module]:
    """(config, model) of a file written by peer-export (its .yaml beside it)."""
    path = Path(path)
    if not path.is_file() or not config_path(path).is_file():
        raise UserError(f"{str(path)!r} and {str(config_path(path))!r}: allowed is a file "
                        "written by peer-export, with its config beside it")
    cfg = load_config(config_path(path))
    state, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} has format {meta.get('format')!r}; allowed: {FORMAT!r}")
    return cfg, build_loaded(cfg, state)


# --------------------------------------------------------------------------- command line

def quiet_env() -> None:
    """Name the accelerator for DeepSpeed, which torch's checkpoint reader imports through its
    plugins: otherwise it guesses and prints a warning (PEER_DEBUG=1 leaves it be)."""
    if os.environ.get("PEER_DEBUG", "") in ("", "0"):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__.split("\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ folder, or one step_* directory")
    p.add_argument("--out", required=True, help="the .safetensors file to write (config "
                   "beside it with .yaml)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    quiet_env()
    t0 = time.perf_counter()
    if not args.out.endswith(".safetensors"):
        print(f"{PROG}: --out={args.out!r}: allowed is a file name ending in .safetensors",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    yaml_out = config_path(out)
    problem = (f"{args.out!r} is a folder" if out.is_dir() else
               f"its config {str(yaml_out)!r} would replace a folder" if yaml_out.is_dir() else
               f"its config {str(yaml_out)!r} would replace a file that no earlier export "
               f"wrote (there is no {args.out!r} beside it)"
               if yaml_out.exists() and not out.exists() else folder_error(out.parent))
    if problem:  # found before the checkpoint is read, not when the file is written
        print(f"{PROG}: --out={args.out!r} is invalid: {problem}; allowed is a .safetensors "
              "file in a folder that can be made and written, whose .yaml name is free or an "
              "earlier export's", file=sys.stderr)
        return 2
    try:
        path, s = export(args.checkpoint, args.out)
    except (UserError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: {path} (step {s['step']}) -> {args.out}: {s['tensors']} tensors, "
          f"{s['params']:,} parameters, {s['bytes'] / 2**20:.1f} MiB; config "
          f"{config_path(Path(args.out))}; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
