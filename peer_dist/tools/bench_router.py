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
import statistics
import time

import torch

from peer_dist import cli
from peer_dist.config import PEERConfig


def parse(argv: list[str]) -> argparse.Namespace:
    p = cli.Parser(prog="peer-bench router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-experts", type=int, default=1024 ** 2)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--d-key", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="one JSON object per line and row")
    args = p.parse_args(argv)
    cfg = PEERConfig(num_experts=args.num_experts, heads=args.heads, topk=args.topk,
                     d_key=args.d_key)
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    if args.tokens < 2 or args.repeats < 1:
        p.error(f"--tokens={args.tokens} --repeats={args.repeats}: allowed are tokens >= 2 "
                "and repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device=cuda: no CUDA device is available here; allowed is cpu")
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
    args = parse(list(argv or []))
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
