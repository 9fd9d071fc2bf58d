"""Which kernels run: force one path for a block (tests, benchmarks), then back to the default.

    "c"        the fused C kernels (CPU fp32/fp64); an error if they cannot be built
    "private"  PyTorch ops with the private aten gather-dot
    "torch"    PyTorch ops only (the reference every other path is tested against)
    "triton"   the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)

The default (no block): Triton on CUDA where it imports, the C kernels on CPU where they build,
else PyTorch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peer_dist.ops import cpu, rows, triton_mix

PATHS = ("c", "private", "torch", "triton")


@contextlib.contextmanager
def kernel_path(name: str) -> Iterator[None]:
    if name not in PATHS:
        raise ValueError(f"kernel path {name!r}: allowed are {list(PATHS)}")
    if name == "triton" and not triton_mix.installed():
        raise RuntimeError("kernel path 'triton': triton is not installed (peer_dist[gpu])")
    cpu.use_fused_cpu(True if name == "c" else False)
    rows.use_private_gather_dot(name == "private")
    triton_mix.use_triton(name == "triton")
    try:
        yield
    finally:
        cpu.use_fused_cpu(None)
        rows.use_private_gather_dot(None)
        triton_mix.use_triton(None)
