"""peer-bench router: the router's precision under bf16 (model.peer.router_dtype).

    peer-bench router                          # N = 1024^2, h = 8, k = 16, d = 1024
    peer-bench router --tokens 4096 --json

A PEER router in training mode (query BatchNorm on) with bf16 parameters and bf16 input, run
with router_dtype=fp32 and router_dtype=activations (all bf16), against an fp32 router holding
the same bf16-rounded weights on the same input. Rows:
  differ_frac   share of selected (token, head, expert) slots whose expert differs from the
                fp32 router's (order within a head ignored)
  gate_err      max |gate - fp32 gate| over the slots whose expert agrees
  fwd_bwd_ms    median forward + backward time of the router (the mix is not included)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time

import torch

from peer_dist import cli
from peer_dist.config import PEERConfig
from peer_dist.tools.bench import add_shape_args, memory_error, shape_error


def parse(argv: list[str]) -> argparse.Namespace:
    p = cli.Parser(prog="peer-bench router", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, num_experts=1024 ** 2, dim=1024, d_key="query dim per head, even")
    p.add_argument("--tokens", type=cli.ints(2, cli.MAX_COUNT), default=2048,
                   help="tokens per batch (>= 2: the query BatchNorm trains on them)")
    p.add_argument("--repeats", type=cli.COUNT, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="one JSON object per line and row")
    args = p.parse_args(argv)
    problem = shape_error(args.num_experts, args.heads, args.topk, args.d_key)
    if problem:
        p.error(problem)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device=cuda is invalid here: this torch sees no CUDA device (allowed: cpu)")
    # three routers (bf16, its fp32 twin, a copy per mode); per token the query and each
    # head's scores against both sub-key sets and the k x k candidates, a few times over
    n, h = math.isqrt(args.num_experts), args.heads
    params = 4 * h * args.d_key * (args.dim + n)
    per_token = 4 * (args.dim + h * args.d_key + 2 * h * n + h * args.topk * args.topk)
    problem = memory_error(f"--num-experts={args.num_experts} --dim={args.dim} --heads={h} "
                           f"--d-key={args.d_key} --topk={args.topk} --tokens={args.tokens}",
                           "the routers and their activations",
                           3 * params + 3 * args.tokens * per_token, args.device)
    if problem:
        p.error(problem)
    return args


def _differ(ids: torch.Tensor, ref: torch.Tensor, heads: int) -> tuple[float, torch.Tensor]:
    """Share of slots not in the reference's set for the same (token, head); agreeing mask."""
    t = ids.shape[0]
    a, b = ids.view(t, heads, -1), ref.view(t, heads, -1)
    agree = (a[..., :, None] == b[..., None, :]).any(-1)  # (T, H, K)
    return 1.0 - float(agree.float().mean()), agree


def _time(router, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        router.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        _, gates = router(x)
        gates.float().square().sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def run(args: argparse.Namespace) -> list[dict]:
    from peer_dist.model.peer import ProductKeyRouter

    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=args.num_experts, heads=args.heads, topk=args.topk,
                     d_key=args.d_key)
    dev = torch.device(args.device)
    low = ProductKeyRouter(args.dim, cfg).to(dev).bfloat16().train()
    ref = copy.deepcopy(low).float()
    x = torch.randn(args.tokens, args.dim, device=dev).bfloat16()
    with torch.no_grad():
        ids_ref, gates_ref = ref(x.float())
    rows = []
    for mode in ("fp32", "activations"):
        r = copy.deepcopy(low)
        r.router_dtype = mode
        with torch.no_grad():
            ids, gates = r(x)
        frac, agree = _differ(ids, ids_ref, args.heads)
        same = ids.view(args.tokens, args.heads, -1) == ids_ref.view(args.tokens, args.heads, -1)
        err = (gates.float() - gates_ref).abs().view(same.shape)[same & agree]
        rows.append(dict(router_dtype=mode, tokens=args.tokens, num_experts=args.num_experts,
                         dim=args.dim, heads=args.heads, topk=args.topk, device=args.device,
                         differ_frac=frac, gate_err=float(err.max()) if err.numel() else 0.0,
                         fwd_bwd_ms=_time(r, x, args.repeats)))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    rows = run(args)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'router_dtype':<12} {'tokens':>6} {'N':>9} {'d':>5} {'h':>2} {'k':>3} "
          f"{'differ %':>9} {'gate err':>9} {'fwd+bwd ms':>11}")
    for r in rows:
        print(f"{r['router_dtype']:<12} {r['tokens']:>6} {r['num_experts']:>9} {r['dim']:>5} "
              f"{r['heads']:>2} {r['topk']:>3} {100 * r['differ_frac']:>9.3f} "
              f"{r['gate_err']:>9.2e} {r['fwd_bwd_ms']:>11.1f}")
    a, b = rows
    print(f"router_dtype=fp32 / activations time = {a['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}x")


if __name__ == "__main__":
    main()
