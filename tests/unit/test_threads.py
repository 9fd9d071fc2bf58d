"""The C kernels with more than one thread: the layer (product-key top-k, sub-key gradient,
row-major mix forward and backward), the ragged mix of dispatch's owners and the row
optimizers at 2 and 4 threads against 1 thread and against the PyTorch kernels; the buffer
pool's eviction and the huge-page path of fresh buffers.

Every other test runs with OMP_NUM_THREADS=1, where ops/cpu.py never splits work: here each
case also counts the fan-out of the thread pool, so a case that silently ran on one thread
fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from peer_dist.config import PEERConfig
from peer_dist.model.peer import PEER
from peer_dist.ops import cpu as fused_cpu
from peer_dist.ops import ragged_mix
from peer_dist.train.sparse_optim import RowSparseOptimizer

pytestmark = pytest.mark.skipif(fused_cpu.library() is None,
                                reason="no C compiler: fused CPU kernels unavailable")
THREADS = (2, 4)
FP64 = dict(rtol=1e-11, atol=1e-12)  # partial sums in another order: rounding only


@pytest.fixture
def fan_out(monkeypatch):
    """Runs ops/cpu.py's kernels with n threads: run(n, fn) -> fn()'s result, and the largest
    number of ranges each kernel was split into (by kernel name)."""
    seen: dict[str, int] = {}
    real = fused_cpu._run_all

    def counting(fn, calls):
        seen[fn.__name__] = max(seen.get(fn.__name__, 1), len(calls))
        return real(fn, calls)

    monkeypatch.setattr(fused_cpu, "_run_all", counting)
    before = torch.get_num_threads()

    def run(n: int, fn, fused: bool = True):
        seen.clear()
        torch.set_num_threads(n)
        fused_cpu.use_fused_cpu(fused)
        try:
            return fn(), dict(seen)
        finally:
            torch.set_num_threads(before)
            fused_cpu.use_fused_cpu(None)

    return run


def _layer_step() -> dict[str, torch.Tensor]:
    """One forward and backward of a float64 PEER layer (training BatchNorm) with a random
    upstream gradient: output, selection and every gradient. 256 tokens x 2 heads x 8 of
    1024 experts: ~950 distinct rows, enough for 4 ranges of the row kernels."""
    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=1024, heads=2, topk=8, d_key=16)
    layer = PEER(32, cfg, table_device="cpu").double().train()
    layer.record_routing = True
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (y * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum().backward()
    out = {"y": y.detach(), "ids": layer.last_routing[0], "dx": x.grad}
    for name, p in layer.named_parameters():
        out[f"d{name}"] = p.grad.to_dense() if p.grad.is_sparse else p.grad
    return out


def _assert_same(got: dict, want: dict, exact: tuple[str, ...] = ()) -> None:
    assert got.keys() == want.keys()
    for k in got:
        if k in exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], **FP64, msg=k)


@pytest.mark.parametrize("threads", THREADS)
def test_layer_on_several_threads_equals_one_thread_and_pytorch(fan_out, threads):
    one, _ = fan_out(1, _layer_step)
    torch_ref, _ = fan_out(1, _layer_step, fused=False)
    many, split = fan_out(threads, _layer_step)
    # every kernel of the layer split its work threads ways (the one-thread run never splits)
    assert split == {f"{k}_f64": threads for k in ("pk_select", "key_grad", "rows_fwd",
                                                   "rows_bwd")}, split
    _assert_same(many, one, exact=("ids",))
    _assert_same(many, torch_ref, exact=("ids",))


def _ragged_step() -> dict[str, torch.Tensor]:
    """dispatch's owner-side mix: 300 bags of 1-13 selections of 900 rows (float64)."""
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(1, 14, (300,), generator=g)
    bag = torch.repeat_interleave(torch.arange(300), sizes)
    rows = torch.randint(0, 900, bag.shape, generator=g)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(bag.shape, generator=g, dtype=torch.float64, requires_grad=True)
    u, v = (torch.randn(900, 24, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in "uv")
    y = ragged_mix(x, rows, bag, gates, u, v, "gelu", sparse_grad=False)
    (y * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dgates": gates.grad, "du": u.grad, "dv": v.grad}


@pytest.mark.parametrize("threads", THREADS)
def test_ragged_mix_on_several_threads(fan_out, threads):
    one, _ = fan_out(1, _ragged_step)
    many, split = fan_out(threads, _ragged_step)
    torch_ref, _ = fan_out(1, _ragged_step, fused=False)
    assert split == {"rows_fwd_f64": threads, "rows_bwd_f64": threads}, split
    _assert_same(many, one)
    _assert_same(many, torch_ref)


def _optimizer_steps(kind: str, state_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """3 steps on 300 of 1000 rows (fp32 table), every touched row updated in one range."""
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(1000, 24, generator=g))
    opt = RowSparseOptimizer([p], kind=kind, lr=0.01, state_dtype=state_dtype)
    for _ in range(3):
        rows = torch.randperm(1000, generator=g)[:300].sort().values
        p.grad = torch.sparse_coo_tensor(rows[None], torch.randn(300, 24, generator=g),
                                         p.shape, check_invariants=True).coalesce()
        opt.step()
    state = {k: t for k, t in opt.state[p].items() if torch.is_tensor(t) and t.dim() > 0}
    return {"p": p.detach().clone(), **state}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("kind, state_dtype", [("lazy_adam", torch.float32),
                                               ("lazy_adam", torch.bfloat16),
                                               ("adagrad", torch.float32),
                                               ("adagrad", torch.bfloat16)])
def test_row_optimizers_on_several_threads(fan_out, threads, kind, state_dtype):
    one, _ = fan_out(1, lambda: _optimizer_steps(kind, state_dtype))
    many, split = fan_out(threads, lambda: _optimizer_steps(kind, state_dtype))
    torch_ref, _ = fan_out(1, lambda: _optimizer_steps(kind, state_dtype), fused=False)
    sfx = "bf16" if state_dtype == torch.bfloat16 else "f32"
    assert split == {f"{kind.replace('lazy_', '')}_rows_{sfx}": threads}, split
    _assert_same(many, one, exact=tuple(one))  # rows are independent: bit for bit
    for k in one:  # against the PyTorch update: fp32 rounding (bf16 state: its rounding)
        tol = dict(rtol=1e-2, atol=1e-3) if one[k].dtype == torch.bfloat16 else dict(
            rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(many[k], torch_ref[k], **tol, msg=k)


def test_pool_evicts_idle_buffers_and_keeps_held_ones():
    pool = fused_cpu.BufferPool(max_buffers=2, headroom=1.0, min_bytes=0)
    if not pool.enabled:
        pytest.skip("storage reference counts unavailable: the pool allocates every time")
    a = pool.take(100, dtype=torch.float32)
    a_ptr = a.data_ptr()
    del a  # idle: reused for a request that fits
    b = pool.take(10, 10, dtype=torch.float32)
    assert b.data_ptr() == a_ptr and b.shape == (10, 10)
    c = pool.take(100, dtype=torch.float32)  # b is held: a new buffer
    assert c.data_ptr() != b.data_ptr()
    del b, c
    big = pool.take(1000, dtype=torch.float32)  # both idle and too small: both let go
    assert [buf.data_ptr() for buf, _ in pool._bufs] == [big.data_ptr()]
    d64 = pool.take(1000, dtype=torch.float64)  # another dtype never reuses a buffer
    assert d64.data_ptr() != big.data_ptr() and len(pool._bufs) == 2
    del d64  # idle, the oldest idle one once a third buffer passes max_buffers=2
    e = pool.take(2000, dtype=torch.int64)
    assert len(pool._bufs) == 2
    assert {buf.dtype for buf, _ in pool._bufs} == {torch.float32, torch.int64}  # d64 gone
    # every pooled buffer held: none may go; the new one is handed out but not kept (the
    # pool never holds more than max_buffers)
    f = pool.take(3000, dtype=torch.int32)
    assert f.shape == (3000,) and f.data_ptr() not in (big.data_ptr(), e.data_ptr())
    assert [buf.data_ptr() for buf, _ in pool._bufs] == [big.data_ptr(), e.data_ptr()]
    pool.clear()
    assert pool._bufs == []
    assert float(big.fill_(2.0).sum()) == 2000.0  # held tensors outlive the pool (the
    # buffers are torch.empty: what they held before is undefined, NaN included)


def _mapping(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding addr."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= addr < hi
        elif inside:
            fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    return fields


def test_large_fresh_buffers_are_huge_page_backed_and_faulted_in():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    t = fused_cpu.empty(4 << 20)  # 16 MiB
    assert t.shape == (4 << 20,) and t.dtype == torch.float32
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * (4 << 20)
    mapping = _mapping(t.data_ptr() + t.numel() * 2)  # the middle of the buffer
    assert mapping.get("THPeligible") == "1", mapping
    rss_kib = int(mapping["Rss"].split()[0])
    assert rss_kib >= 15 * 1024, mapping  # faulted in by touch_pages, not page by page later
    small = fused_cpu.empty(1000)  # below 4 MiB: plain torch.empty
    assert small.numel() == 1000
    assert math.isfinite(float(t[-1]))
