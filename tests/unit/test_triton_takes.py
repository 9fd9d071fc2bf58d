"""When the Triton kernels do not run: triton_mix.takes() refuses, no Triton launch happens
(a spy on the launch functions counts zero) and the path that runs instead gives the right
result. Wide rows, non-contiguous tables (a transposed v gave wrong results on the Triton
path when only u was checked), tables of two dtypes, fp64, and CPU tensors without the
interpreter forced on (the default).
"""

from __future__ import annotations

import pytest
import torch
from test_triton_kernels import _dense, _reference

from peer_dist.ops import peer_mix, triton_mix
from peer_dist.ops.paths import kernel_path

pytestmark = pytest.mark.skipif(not triton_mix.installed(), reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def launches(count_calls):
    """Calls of any Triton launch function."""
    return count_calls(triton_mix, ("forward", "backward_bags", "row_grads"))


def _tables(kind: str, n: int, d: int):
    """(u, v) of one refused kind, and the dtype of x."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(n, d, generator=g) * d ** -0.5
    v = torch.randn(n, d, generator=g)
    if kind == "v-transposed":  # same values, rows strided by 1 and columns by n
        v = v.t().contiguous().t()
    elif kind == "u-sliced":  # every other column of a wider table
        u = (torch.randn(n, 2 * d, generator=g) * d ** -0.5)[:, ::2]
    elif kind == "mixed-dtypes":
        v = v.bfloat16()
    elif kind == "fp64":
        u, v = u.double(), v.double()
    return u.to(DEVICE), v.to(DEVICE), torch.float64 if kind == "fp64" else torch.float32


@pytest.mark.parametrize("kind", ["wide", "v-transposed", "u-sliced", "mixed-dtypes", "fp64"])
def test_refused_layouts_never_launch_and_give_the_right_result(kind, launches):
    d = triton_mix.MAX_DIM + 1 if kind == "wide" else 24
    u, v, x_dtype = _tables(kind, 12, d)
    g = torch.Generator().manual_seed(4)  # every draw its own: any test order, same values
    x = torch.randn(3, d, generator=g, dtype=x_dtype).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 12, (3, 4), generator=g).to(DEVICE)
    gates = torch.rand(3, 4, generator=g, dtype=x_dtype).to(DEVICE).requires_grad_()
    u.requires_grad_()
    v.requires_grad_()
    grad_y = torch.randn(3, d, generator=g, dtype=x_dtype).to(DEVICE)
    with kernel_path("triton"):
        assert not triton_mix.takes(x, u, v)
        y = peer_mix(x, ids, gates, u, v, sparse_grad=False)
        got = torch.autograd.grad((y * grad_y).sum(), [x, gates, u, v])
    assert launches["n"] == 0
    bag = torch.arange(3, device=DEVICE).repeat_interleave(4)
    want = _reference(x, ids.reshape(-1), bag, gates.reshape(-1), u, v, "gelu", grad_y)
    # a bf16 v rounds products to 8 bits: over 200 draws the worst error was 1.9% of the
    # largest value (1e-2 failed on 5 of them)
    tol = 3e-2 if kind == "mixed-dtypes" else 1e-5
    for name, g, w in zip(["y", "x", "gates", "u", "v"], [y, *got], want, strict=True):
        scale = float(w.abs().max()) + 1e-6
        torch.testing.assert_close(_dense(g).reshape(w.shape), w, rtol=0, atol=tol * scale,
                                   msg=lambda m, name=name: f"{kind} {name}: {m}")


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU default only")
def test_cpu_tensors_take_another_path_by_default(launches):
    """No kernel_path block: CPU tensors never go to the interpreter, even with
    TRITON_INTERPRET=1 set (as in this test process)."""
    u, v, _ = _tables("plain", 12, 24)
    x = torch.randn(3, 24)
    assert not triton_mix.takes(x, u, v)
    with kernel_path("triton"):
        assert triton_mix.takes(x, u, v)  # forced on: the interpreter takes them
    y = peer_mix(x, torch.randint(0, 12, (3, 4)), torch.rand(3, 4), u, v)
    assert launches["n"] == 0 and y.shape == (3, 24) and y.abs().sum() > 0


def test_takes_refuses_each_operand():
    """Every operand is checked: v's layout, dtype, shape and device, not only u's."""
    u = torch.randn(6, 8, device=DEVICE)
    x = torch.randn(2, 8, device=DEVICE)
    with kernel_path("triton"):
        assert triton_mix.takes(x, u, u.clone())
        assert not triton_mix.takes(x, u, u.t().contiguous().t())  # v strided
        assert not triton_mix.takes(x, u, u.half())  # v another dtype
        assert not triton_mix.takes(x, u, torch.randn(7, 8, device=DEVICE))  # v's shape
        assert not triton_mix.takes(x.double(), u, u)  # fp64 activations
        assert not triton_mix.takes(x, u.double(), u.double())  # fp64 tables
        assert not triton_mix.takes(x, u[:, :0], u[:, :0])  # empty rows
