"""Loading a checkpoint never runs code from it.

Every pickle a checkpoint holds goes through a reader that builds only tensors, plain data and
an allow-list of data classes, and refuses anything else before it is constructed:

  rng/rank_<r>.pt, dense_full.pt, dense/*.pt   torch.load(weights_only=True) with ALLOWED added
                                               (DeepSpeed's engine loads through `engine_loads`)
  tables/.metadata                             DCP's metadata, a plain pickle: MetadataUnpickler
                                               (DCP's own classes, torch dtypes and Size only)
  tables/*.distcp                              DCP reads tensors with weights_only=True itself

A file that holds anything else makes the checkpoint invalid (`problem`), which the manifest
check cannot catch: whoever can write the files can also rewrite the manifest.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# DCP metadata: the classes its pickle names (torch 2.4-2.13), checked by module and name.
_DCP_METADATA = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name, from torch's own table
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
_TORCH_DATA = {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None),
                                                                   torch.dtype)}


def allowed_globals() -> list[Any]:
    """Non-tensor types our own and DeepSpeed's files hold (numpy: the RNG state; DeepSpeed
    0.16-0.19: ZeRO's stage enum, loss scaler and fragment addresses). Data classes only."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    out: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct,
                      type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # a tool that reads checkpoints without DeepSpeed
        pass
    return out


def load_tensors(path: str | Path, map_location: Any = None) -> Any:
    """torch.load that builds tensors, plain containers and the allow-list, nothing else."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA.get(module, ()) or (module == "torch" and name in _TORCH_DATA):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: str | Path) -> Any:
    with open(path, "rb") as f:
        return MetadataUnpickler(f).load()


def reader(path: str | Path) -> Any:
    """A DCP FileSystemReader whose metadata goes through MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_metadata(self._get_metadata_path(kwargs.get("rank")))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def problem(path: Path, name: str) -> str | None:
    """Why checkpoint file `name` (relative to the checkpoint `path`) may not be loaded, or
    None. Only pickles are read: .pt files and DCP's .metadata."""
    try:
        if name.endswith(".pt"):
            load_tensors(path / name, map_location="cpu")
        elif name.endswith(".metadata"):
            read_metadata(path / name)
    except Exception as e:  # UnpicklingError, or a damaged file's own error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), first)
        return (f"is refused: {name} holds something other than tensors and plain data "
                f"({detail[:160]}); a checkpoint is never run as code")
    return None


@contextlib.contextmanager
def engine_loads(engine: Any) -> Iterator[None]:
    """DeepSpeed's engine reads its files through `engine.checkpoint_engine.load` (0.16-0.19),
    which unpickles with weights_only=False: load them with `load_tensors` instead."""
    ce = engine.checkpoint_engine
    ce.load = lambda path, map_location=None: load_tensors(path, map_location)
    try:
        yield
    finally:
        del ce.load  # the instance attribute: the class's method again
