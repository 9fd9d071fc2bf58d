"""The PEER layer (arXiv 2407.04153): product-key routing plus a million single-neuron experts.

Shape legend: T = tokens, D = model dim, H = heads, K = topk per head, S = H * K,
n = sqrt(N) sub-keys per set, Q = d_key (query dim per head).

The layer has two halves with a narrow seam between them, so that parallelism can swap one:
  router:  x (T, D) -> ids (T, S) int64, gates (T, S)   replicated on every rank
  experts: (x, ids, gates) -> y (T, D)                  single-process here, sharded in parallel/
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peer_dist.config import PEERConfig
from peer_dist.errors import UserError
from peer_dist.ops import cpu, key_scores, mix, peer_mix

INIT_BLOCK_ROWS = 16384
TABLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.peer.table_dtype


def init_rows(seed: int, start: int, stop: int, dim: int, std: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, stop) of an N x dim table drawn from normal(0, std).

    Row r's value depends only on (seed, r): the table is generated in fixed blocks of
    INIT_BLOCK_ROWS rows, each from its own generator, so a shard can be initialised to exactly
    the single-process rows without building the whole table.
    """
    out = torch.empty(max(stop - start, 0), dim, dtype=dtype)
    block = start // INIT_BLOCK_ROWS
    while block * INIT_BLOCK_ROWS < stop:
        b0 = block * INIT_BLOCK_ROWS
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63 - 1))
        lo, hi = max(start, b0), min(stop, b0 + INIT_BLOCK_ROWS)
        if hi - lo == INIT_BLOCK_ROWS and dtype == torch.float32:
            # whole block: draw straight into the table (no temporary the allocator keeps)
            torch.randn(INIT_BLOCK_ROWS, dim, generator=gen, out=out[lo - start:hi - start])
            out[lo - start:hi - start].mul_(std)
        else:
            rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=gen).mul_(std)
            out[lo - start:hi - start] = rows[lo - b0:hi - b0]
        block += 1
    return out


class ProductKeyRouter(nn.Module):
    """Query network, optional BatchNorm, per-head (or shared) sub-keys; exact top-k.

    Runs in fp32 under bf16 activations and parameters by default (cfg.router_dtype): the
    weights are upcast where used, so the selection sees no bf16 rounding of queries or scores.
    An empty batch goes through every step (a synchronised BatchNorm's collectives included),
    so a rank with no tokens never leaves the others waiting."""

    def __init__(self, dim: int, cfg: PEERConfig):
        super().__init__()
        cfg.validate()  # built directly too, not only through the config loader
        self.heads, self.topk, self.d_key = cfg.heads, cfg.topk, cfg.d_key
        self.router_dtype = cfg.router_dtype
        self.n = math.isqrt(cfg.num_experts)
        self.query = nn.Linear(dim, cfg.heads * cfg.d_key, bias=False)
        self.norm = nn.BatchNorm1d(cfg.heads * cfg.d_key) if cfg.query_batchnorm else nn.Identity()
        key_sets = 1 if cfg.shared_keys else cfg.heads
        # (key_sets, 2, n, Q/2): two sub-key sets per head, PKM's uniform(+-1/sqrt(Q/2)) init
        bound = 1.0 / math.sqrt(cfg.d_key // 2)
        self.sub_keys = nn.Parameter(
            torch.empty(key_sets, 2, self.n, cfg.d_key // 2).uniform_(-bound, bound))
        self._pair_cache: dict[torch.device, torch.Tensor] = {}

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        low = x.dtype in (torch.bfloat16, torch.float16)
        return torch.float32 if self.router_dtype == "fp32" and low else x.dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> ids (T, H*K) int64, gates (T, H*K) softmax over each head's K."""
        t, h, k, n = x.shape[0], self.heads, self.topk, self.n
        dtype = self.compute_dtype(x)
        q = F.linear(x.to(dtype), self.query.weight.to(dtype))
        q = self._normalise(q).view(t, 2 * h, self.d_key // 2)  # channel c = 2*head + half
        q = q.transpose(0, 1)  # (2H, T, Q/2)
        keys = self.sub_keys.to(dtype).expand(h, -1, -1, -1).reshape(2 * h, n, -1)
        sel1, sel2 = self._select(q.detach(), keys.detach())  # (H, T, K) each
        sel = torch.stack([sel1, sel2], dim=1).view(2 * h, t, k)
        scores = key_scores(q, sel, keys).view(h, 2, t, k).sum(1)  # (H, T, K)
        ids = (sel1 * n + sel2).transpose(0, 1).reshape(t, h * k)
        gates = F.softmax(scores, dim=-1).transpose(0, 1).reshape(t, h * k)
        return ids, gates

    def _normalise(self, q: torch.Tensor) -> torch.Tensor:
        """The query BatchNorm, in q's dtype whatever its parameters' dtype."""
        norm = self.norm
        if not isinstance(norm, nn.BatchNorm1d):
            return norm(q)  # Identity, or the synchronised BatchNorm (any batch, any dtype)
        if norm.training and q.shape[0] <= 1:
            if q.shape[0] == 0:  # nothing to normalise, and this BatchNorm has no collective
                return q
            raise UserError(
                "model.peer.query_batchnorm: a training batch of 1 token on one rank cannot be "
                "normalised (BatchNorm needs more than 1 value per channel); allowed are "
                "parallel.bn_sync=global (statistics over every rank's tokens), more tokens "
                "per rank, or model.peer.query_batchnorm=false")
        if all(t is None or t.dtype == q.dtype for t in (norm.weight, norm.running_mean)):
            return norm(q)
        return _batch_norm_upcast(norm, q)

    def _pairs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate pairs (i, j) of the two sorted top-k lists with (i+1)(j+1) <= K.

        Pair (i, j) scores below the (i+1)(j+1) - 1 pairs (i' <= i, j' <= j), so only these
        can be in the top K: 50 of the K*K = 256 candidates for K = 16, still exact.
        """
        cached = self._pair_cache.get(device)
        if cached is None:
            k = self.topk
            pairs = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
            cached = torch.tensor(pairs, dtype=torch.long, device=device).T.contiguous()
            self._pair_cache[device] = cached
        return cached[0], cached[1]

    @torch.no_grad()
    def _select(self, q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact product-key top-k: q (2H, T, Q/2), keys (2H, n, Q/2) -> sub-key ids (H, T, K)."""
        h, t, k = self.heads, q.shape[1], self.topk
        pi, pj = self._pairs(q.device)
        if t == 0:
            empty = torch.zeros(h, 0, k, dtype=torch.int64, device=q.device)
            return empty, empty.clone()
        if cpu.usable(q, keys):  # one pass per row, no sort, no (H, T, P) temporaries
            # token chunks of ~4 MiB of scores: selection reads them from cache, not memory
            step = max(16, (1 << 20) // (2 * h * keys.shape[1]))
            sels = [cpu.pk_select(torch.bmm(q[:, a:a + step], keys.transpose(1, 2)),
                                        pi, pj, k) for a in range(0, t, step)]
            return torch.cat([s1 for s1, _ in sels], 1), torch.cat([s2 for _, s2 in sels], 1)
        # other devices (CUDA): token chunks bound the (2H, chunk, n) scores, exact all the same
        step = max(1, mix.SCORE_CHUNK // (2 * h * keys.shape[1]))
        sels = [self._select_torch(q[:, a:a + step], keys, pi, pj) for a in range(0, t, step)]
        if len(sels) == 1:
            return sels[0]
        return torch.cat([s1 for s1, _ in sels], 1), torch.cat([s2 for _, s2 in sels], 1)

    def _select_torch(self, q, keys, pi, pj) -> tuple[torch.Tensor, torch.Tensor]:
        h, t, k = self.heads, q.shape[1], self.topk
        scores = torch.bmm(q, keys.transpose(1, 2))  # (2H, T, n)
        top_v, top_i = scores.topk(k, dim=-1)  # (2H, T, K) sorted
        top_v, top_i = top_v.view(h, 2, t, k), top_i.view(h, 2, t, k)
        cand = top_v[:, 0][..., pi] + top_v[:, 1][..., pj]  # (H, T, P)
        best = cand.topk(k, dim=-1).indices  # (H, T, K), sorted by score
        return top_i[:, 0].gather(-1, pi[best]), top_i[:, 1].gather(-1, pj[best])


def _batch_norm_upcast(bn: nn.BatchNorm1d, q: torch.Tensor) -> torch.Tensor:
    """bn(q) where q, the parameters and the running statistics do not share a dtype (bf16
    parameters beside fp32 statistics under train.dtype=bf16, fp32 queries beside bf16
    parameters): computed in fp32, returned in q's dtype; the statistics are updated in fp32
    (on copies: autograd keeps the ones it was given) and stored back in their own dtype."""
    f32 = torch.float32
    track = bn.track_running_stats and bn.running_mean is not None
    use_batch = bn.training or not track
    rm = bn.running_mean.to(f32, copy=True) if track else None
    rv = bn.running_var.to(f32, copy=True) if track else None
    momentum = 0.0
    if bn.training and track:
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else (
            1.0 / float(bn.num_batches_tracked))
    weight = None if bn.weight is None else bn.weight.to(f32)
    bias = None if bn.bias is None else bn.bias.to(f32)
    out = F.batch_norm(q.to(f32), rm, rv, weight, bias, use_batch, momentum, bn.eps)
    if bn.training and track:
        with torch.no_grad():
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
    return out.to(q.dtype)


class ExpertTables(nn.Module):
    """The two N x D tables U (down) and V (up) of one PEER layer, on one process.

    Built on the meta device by default (`materialize()` allocates and initialises them), so a
    sharded twin can replace them without the full tables ever being allocated.
    """

    def __init__(self, num_experts: int, dim: int, activation: str, seed: int,
                 device: torch.device | str = "meta", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_experts, self.dim, self.activation, self.seed = num_experts, dim, activation, seed
        self.std = dim ** -0.5  # PKM / Memory Layers init: normal(0, D^-1/2)
        self.u = nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=dtype))
        self.v = nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=dtype))
        if torch.device(device).type != "meta":
            self.materialize(device, dtype)

    def table_seeds(self) -> tuple[int, int]:
        return 2 * self.seed + 1, 2 * self.seed + 2

    def materialize(self, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> None:
        """Allocate and initialise the tables (in their dtype unless one is given); values
        are drawn in fp32 and rounded, so a bf16 table is the fp32 one rounded."""
        dtype = dtype or self.u.dtype
        su, sv = self.table_seeds()
        n, d = self.num_experts, self.dim
        self.u = nn.Parameter(init_rows(su, 0, n, d, self.std).to(device, dtype))
        self.v = nn.Parameter(init_rows(sv, 0, n, d, self.std).to(device, dtype))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return peer_mix(x, ids, gates, self.u, self.v, self.activation, sparse_grad=True)


class PEER(nn.Module):
    """Drop-in FFW replacement: x (..., D) -> (..., D)."""

    def __init__(self, dim: int, cfg: PEERConfig, seed: int = 0,
                 table_device: torch.device | str = "meta"):
        super().__init__()
        self.cfg = cfg
        self.router = ProductKeyRouter(dim, cfg)
        self.experts = ExpertTables(cfg.num_experts, dim, cfg.activation, seed, table_device,
                                    TABLE_DTYPES[cfg.table_dtype])
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.record_routing = False  # set by evaluation to collect expert statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, gates = self.router(x)
        if self.record_routing:
            self.last_routing = (ids.detach(), gates.detach())
        return self.experts(x, ids, gates).view(shape)
