"""The kernels' one home: one function per primitive, the C path (CPU) and the PyTorch path
side by side behind it (Triton for CUDA goes beside them).

    ops.peer_mix(x, ids, gates, u, v)      the expert mix, row-sparse table gradients
    ops.ragged_mix(x, rows, bag, gates, u, v)  the same mix over bags of any size (dispatch)
    ops.key_scores(q, sel, keys)           the selected sub-key scores
    ops.rows                               gather_dot, bag_sum, ragged_*, RowGroups, row_grad
    ops.cpu                                the C kernels (ctypes), product-key top-k, row
                                           optimizers, buffer pool; csrc/ holds the C
    ops.build                              compile once per machine, cached, under a lock

No torch.distributed here; model/ and the optimizers import ops/, never the reverse.
"""

from peer_dist.ops.mix import activation, activation_grad, key_scores, peer_mix, ragged_mix
from peer_dist.ops.rows import check_ids

__all__ = ["activation", "activation_grad", "check_ids", "key_scores", "peer_mix",
           "ragged_mix"]
