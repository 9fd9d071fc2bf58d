"""Data: tokenizers, the token-shard format, preparing shards from text, the dataset.

    prepare_dataset(cfg.data)            data.path from data.source if it is not there yet
    TokenDataset(path).batch(...)        deterministic batches, a pure function of the step
"""

from peer_dist.data.dataset import META_FILE, SPLITS, TokenDataset, token_dtype
from peer_dist.data.prepare import prepare, prepare_dataset
from peer_dist.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["META_FILE", "SPLITS", "ByteTokenizer", "HFTokenizer", "TokenDataset",
           "load_tokenizer", "prepare", "prepare_dataset", "token_dtype"]
