"""The kernels' one home: one function per primitive, the C path (CPU) and the PyTorch path
side by side behind it, and Triton for CUDA beside them.

    ops.peer_mix(x, ids, gates, u, v)      the expert mix, row-sparse table gradients
    ops.ragged_mix(x, rows, bag, gates, u, v)  the same mix over bags of any size (dispatch)
    ops.key_scores(q, sel, keys)           the selected sub-key scores
    ops.rows                               gather_dot, bag_sum, ragged_*, RowGroups, row_grad
    ops.cpu                                the C kernels (ctypes), product-key top-k, row
                                           optimizers, buffer pool; csrc/ holds the C
    ops.triton_mix                         the mix's Triton kernels (CUDA; CPU tensors under
                                           TRITON_INTERPRET=1 in the tests)
    ops.build                              compile once per machine, cached, under a lock

No torch.distributed here; model/ and the optimizers import ops/, never the reverse.
"""

from peer_dist.ops.mix import (
    activation,
    activation_grad,
    key_scores,
    mix_dtype,
    peer_mix,
    ragged_mix,
)
from peer_dist.ops.rows import check_ids

__all__ = ["activation", "activation_grad", "check_ids", "key_scores", "mix_dtype", "peer_mix",
           "ragged_mix"]
