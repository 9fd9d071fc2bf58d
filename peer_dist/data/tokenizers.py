"""Tokenizers: UTF-8 bytes (vocab 256, the default), or a Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

# Tried in order to find a Hugging Face tokenizer's end-of-document token.
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Any) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no unknowns, no training. Byte 0 ends a document."""

    vocab_size = 256
    eos_id: int | None = 0
    spec = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte tokenizer: ids must lie in [0, 255], got [{arr.min()}, "
                             f"{arr.max()}]")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (the `tokenizers` package is imported lazily)."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:
            raise ImportError(
                f"tokenizer {str(path)!r} needs the `tokenizers` package, which is not "
                "installed: pip install tokenizers (or pip install 'peer_dist[hf]'), or use "
                "data.tokenizer=byte") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist: allowed are "
                                    "'byte' or the path of a tokenizers JSON file")
        self.path = path
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust library raises a bare Exception
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"tokenizer file {str(path)!r} is not a Hugging Face tokenizers "
                             f"file ({why}): allowed are 'byte' or the tokenizer.json a "
                             "tokenizers Tokenizer saved") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for t in HF_EOS_CANDIDATES
                            if (i := self._tok.token_to_id(t)) is not None), None)
        self.spec = str(path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in out]

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        return self._tok.decode(arr.astype(np.int64).tolist(), skip_special_tokens=False)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte' -> ByteTokenizer; a path to a tokenizers JSON file -> HFTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not spec.endswith(".json"):
        raise ValueError(f"tokenizer={spec!r} is invalid: allowed are 'byte' or the path of a "
                         "Hugging Face tokenizers .json file")
    return HFTokenizer(spec)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; larger vocabularies need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


