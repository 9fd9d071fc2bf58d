"""Pure nn.Modules (no torch.distributed): product keys, PEER, the transformer LM."""

from peer_dist.model.peer import PEER, ExpertTables, ProductKeyRouter, init_rows
from peer_dist.model.transformer import Transformer, build_model, lm_loss

__all__ = ["PEER", "ExpertTables", "ProductKeyRouter", "Transformer", "build_model", "init_rows",
           "lm_loss"]
