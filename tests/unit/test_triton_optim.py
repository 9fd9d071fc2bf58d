"""The fused Triton row optimizers (lazy Adam with global or per-row bias correction, row-wise
Adagrad; fp32 or bf16 tables and state) against the PyTorch row updates of
RowSparseOptimizer and, for fp32, the C row kernels: several steps of sparse gradients with
repeated and untouched rows. On CPU under the interpreter (forced on by kernel_path), on CUDA
where there is one; a spy checks the Triton kernels ran.
"""

from __future__ import annotations

import pytest
import torch

from peer_dist.ops import cpu, triton_mix, triton_optim
from peer_dist.ops.paths import kernel_path
from peer_dist.train.sparse_optim import RowSparseOptimizer

pytestmark = pytest.mark.skipif(not triton_mix.installed(), reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 30
STEPS = [[0, 3, 7], [3, 4, 29], [7, 3, 3, 10], [1, 2], [0, 29, 20, 3]]  # a duplicate at 3
KINDS = [("lazy_adam", "global"), ("lazy_adam", "row"), ("adagrad", "global")]
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
         (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


@pytest.fixture
def calls(count_calls):
    return count_calls(triton_optim, ("adam_rows", "adagrad_rows"))


def _train(path: str, kind: str, bc: str, table: torch.dtype, state: torch.dtype, d: int):
    """The table and its state after len(STEPS) steps on `path`."""
    g = torch.Generator().manual_seed(1)
    p = (torch.randn(N, d, generator=g)).to(table).to(DEVICE).requires_grad_()
    opt = RowSparseOptimizer([p], kind=kind, lr=0.05, betas=(0.9, 0.95), eps=1e-6,
                             state_dtype=state, bias_correction=bc)
    with kernel_path(path):
        for rows in STEPS:
            values = torch.randn(len(rows), d, generator=g).to(DEVICE)
            p.grad = torch.sparse_coo_tensor(torch.tensor(rows, device=DEVICE)[None], values,
                                             (N, d), check_invariants=True).to(table)
            opt.step()
    st = opt.state[p]
    return [p.detach()] + [st[k] for k in ("exp_avg", "exp_avg_sq", "sum_sq") if k in st]


@pytest.mark.parametrize("kind,bc", KINDS, ids=["adam", "adam-row-bc", "adagrad"])
@pytest.mark.parametrize("table,state", PAIRS, ids=["fp32", "bf16-table", "bf16-state",
                                                    "bf16-both"])
def test_row_updates_match_the_pytorch_path(kind, bc, table, state, calls):
    want = _train("torch", kind, bc, table, state, 24)
    assert calls["n"] == 0
    got = _train("triton", kind, bc, table, state, 24)
    assert calls["n"] == len(STEPS)
    low = torch.bfloat16 in (table, state)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        # bf16: one rounding each, so at most one bf16 unit (2^-8 relative) apart
        tol = dict(rtol=2 ** -7, atol=1e-6) if low else dict(rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **tol)
    untouched = [r for r in range(N) if not any(r in s for s in STEPS)]
    init = torch.randn(N, 24, generator=torch.Generator().manual_seed(1)).to(table)
    assert torch.equal(got[0][untouched].cpu(), init[untouched])


@pytest.mark.parametrize("kind,bc", KINDS, ids=["adam", "adam-row-bc", "adagrad"])
def test_column_parts_match_the_c_kernels(kind, bc, calls, monkeypatch):
    """Rows in three column parts (d = 300, PART_COLS = 128) against the C row kernels."""
    if cpu.library() is None or DEVICE == "cuda":
        pytest.skip("the C kernels compare on CPU only")
    want = _train("c", kind, bc, torch.float32, torch.float32, 300)
    monkeypatch.setattr(triton_mix, "PART_COLS", 128)
    assert triton_mix.plan(300, torch.float32).PARTS == 3
    got = _train("triton", kind, bc, torch.float32, torch.float32, 300)
    assert calls["n"] == len(STEPS)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_takes_refuses_what_it_cannot_update():
    p = torch.zeros(4, 8)
    g = torch.zeros(2, 8)
    with kernel_path("triton"):
        assert triton_optim.takes(p, g, torch.zeros(4, 8))
        assert not triton_optim.takes(p.double(), g.double(), torch.zeros(4, 8).double())
        assert not triton_optim.takes(p, g.t().contiguous().t()[:, :8], torch.zeros(4, 8).t())
        assert not triton_optim.takes(p, g.bfloat16(), torch.zeros(4, 8))
    assert not triton_optim.takes(p, g, torch.zeros(4, 8))  # CPU, not forced: the C path
