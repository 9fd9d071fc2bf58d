"""The token-shard format and the deterministic dataset.

A prepared dataset is a folder written by `peer-prepare` (peer_dist/data/prepare.py):

    meta.json    vocab size, dtype, token counts, tokenizer spec, sources, documents
    train.bin    flat token ids (uint16 when vocab_size <= 65536, else uint32)
    val.bin      the held-out documents, same format
    tokenizer.json   only for a Hugging Face tokenizer (a copy, so the folder is self-contained)

Documents are concatenated, each followed by the tokenizer's end-of-document id when it has one
(byte 0 for the byte tokenizer: text files never contain NUL).

Batches are a pure function of (seed, split, step, rank): each rank walks its own random order of
non-overlapping (seq_len + 1)-token windows, epoch after epoch. Nothing depends on the world size
or on earlier steps, so a run resumed at step s (on any number of ranks) reads exactly the batches
an uninterrupted run would have read at step s on the same ranks; there is no loader state to save.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from peer_dist.data.tokenizers import ByteTokenizer, HFTokenizer

SPLITS = ("train", "val")
META_FILE = "meta.json"
HF_TOKENIZER_FILE = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; larger vocabularies need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


class TokenDataset:
    """Memory-mapped token shards of a prepared folder; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{str(meta_file)!r} does not exist: prepare the data with "
                                    f"`peer-prepare <inputs> --out {self.path}`")
        self.meta = json.loads(meta_file.read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = self.meta.get("eos_id")
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = {s: self._open(s, dtype) for s in SPLITS}
        self._perm_cache: dict[tuple[int, str, int, int, int], tuple[np.ndarray, int]] = {}

    def _open(self, split: str, dtype: np.dtype) -> np.ndarray:
        n = int(self.meta["tokens"][split])
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))

    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        spec = self.meta["tokenizer"]
        return ByteTokenizer() if spec == "byte" else HFTokenizer(self.path / spec)

    def num_tokens(self, split: str) -> int:
        return len(self._split(split))

    def _split(self, split: str) -> np.ndarray:
        if split not in self.tokens:
            raise ValueError(f"split={split!r} is invalid: allowed are {list(SPLITS)}")
        return self.tokens[split]

    def _num_windows(self, split: str, seq_len: int) -> int:
        n = len(self._split(split))
        if seq_len < 1 or n < seq_len + 1:
            raise ValueError(f"split {split!r} of {str(self.path)!r} has {n} tokens: it needs at "
                             f"least seq_len + 1 = {seq_len + 1} (seq_len must be >= 1); use a "
                             "smaller seq_len or more data (or a larger val_fraction)")
        return n // (seq_len + 1)

    def _epoch_order(self, split: str, seq_len: int, seed: int, rank: int,
                     epoch: int) -> tuple[np.ndarray, int]:
        """Window order and grid shift of one rank's epoch, from (seed, split, rank, epoch)."""
        key = (seed, split, rank, epoch, seq_len)
        if key not in self._perm_cache:
            w = self._num_windows(split, seq_len)
            rng = np.random.Generator(np.random.PCG64(
                [seed, SPLITS.index(split), rank, epoch, seq_len]))
            # Shift the window grid by up to the slack so epochs see different boundaries.
            slack = len(self.tokens[split]) - w * (seq_len + 1)
            shift = int(rng.integers(0, slack + 1))
            if len(self._perm_cache) >= 8:
                self._perm_cache.clear()
            self._perm_cache[key] = (rng.permutation(w), shift)
        return self._perm_cache[key]

    def batch(self, split: str, step: int, rank: int, batch_size: int, seq_len: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, L) int64; targets are inputs shifted by one token.

        Rank `rank` at step `step` reads samples [step*B, (step+1)*B) of its own endless stream
        (an independent random order of windows per epoch).
        """
        if batch_size < 1 or step < 0 or rank < 0 or seed < 0:
            raise ValueError(f"batch_size={batch_size}, step={step}, rank={rank}, seed={seed}: "
                             "allowed are batch_size >= 1 and step, rank, seed >= 0")
        w = self._num_windows(split, seq_len)
        samples = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        epochs, pos = np.divmod(samples, w)
        starts = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            order, shift = self._epoch_order(split, seq_len, seed, rank, int(epoch))
            sel = epochs == epoch
            starts[sel] = shift + order[pos[sel]] * (seq_len + 1)
        return self._windows(split, starts, seq_len)

    def _windows(self, split: str, starts: np.ndarray,
                 seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.tokens[split]
        rows = np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        rows_t = torch.from_numpy(rows)  # (B, L + 1)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()

    def eval_batches(self, batch_size: int, seq_len: int, split: str = "val",
                     max_batches: int | None = None, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows from the start of `split`, in order; the same on every run.

        Global batch b holds windows [b*B, (b+1)*B) (the last one may be shorter); rank r yields
        the batches with b % world_size == r among the first `max_batches` (all when None), so
        callers must weight losses by tokens when they average over ranks.
        """
        w = self._num_windows(split, seq_len)
        total = -(-w // batch_size)
        if max_batches is not None:
            total = min(total, max_batches)
        for b in range(rank, total, world_size):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, w), dtype=np.int64)
            yield self._windows(split, ids * (seq_len + 1), seq_len)
