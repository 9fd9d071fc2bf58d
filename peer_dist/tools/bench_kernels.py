"""peer-bench kernels: every Triton kernel the project launches, compiled ahead of time for
sm_80 and sm_90 (no GPU needed) with the launch parameters triton_mix.plan really picks and
the specialisation the JIT gives at launch (pointers and integers divisible by 16 where they
are), and what the cubin says a GPU will see:

    peer-bench kernels                            # the full grid: 3 mix kernels + optimizer
    peer-bench kernels --dims 1024 --dtypes bf16 --archs 90 --json

Columns, one row per (kernel, arch, d, table dtype, activation dtype):
  registers, spill_bytes   per thread (cuobjdump --dump-resource-usage: REG, LOCAL + STACK)
  shared_bytes             the dynamic shared memory the launch requests
  programs_per_sm          occupancy from registers, shared memory and warps
  row_load_bits            the narrowest table-row load in the SASS (128 = 16-byte vectors);
                           table-row loads are the kernels' only L2-only (.cg) loads
  inflight_bytes           table-row bytes a program has issued before it first waits: at a
                           barrier, or at an instruction that reads a loaded row's register
  loop_barriers            barriers inside the tile loops (in the SASS: a backward branch's
                           span), each loop counted once
  loads_after_barrier      table-row loads a loop issues after its first barrier: 0 means
                           every tile's U and V rows are in flight before any wait there
  inflight_bytes_per_sm    inflight_bytes x programs_per_sm
  inflight_needed_*        what HBM needs in flight per SM by Little's law: bandwidth x
                           latency / SMs (H100 SXM 3.35 TB/s, H200 4.8 TB/s, 132 SMs each)

The latency is an assumption (--latency-ns, default 600 ns, the figure of the design notes):
unloaded pointer-chasing measurements of HBM latency on Hopper are lower, and a memory system
at full bandwidth queues requests above that. This is a static estimate, not a speed: GPU
speed is measured only by launch/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile

import torch

from peer_dist import cli
from peer_dist.ops import triton_mix

ARCHS = (80, 90)
DIMS = (256, 512, 768, 1000, 1024, 2048, 4096, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MIX_KERNELS = ("mix_fwd", "mix_bwd_bags", "row_grads")
# per SM: registers, shared memory (bytes usable by blocks), warps, blocks; 1 KiB of shared
# memory reserved per block
SM = {80: dict(regs=65536, smem=164 * 1024, warps=64, blocks=32),
      90: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32)}
HBM = {"H100": 3.35e12, "H200": 4.8e12}
MAX_LATENCY_NS = 1e6  # 1 ms: far above any memory's latency; a bound that catches typos
MAX_JOBS = 64  # compiler processes: the full grid is 160 compiles, each a few hundred MB
SMS = 132


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compile: a kernel, its argument types (in order), constexprs and warps."""

    kernel: str
    module: str
    d: int
    table_dtype: str
    act_dtype: str
    types: tuple[tuple[str, str], ...]  # (name, "*bf16" | "i32" | ...), runtime args only
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    divisible: tuple[str, ...]  # integer args the JIT would specialise as multiples of 16
    active: float  # share of a row load's lanes holding columns < d (padding to C * CH)


def _mix_spec(kernel: str, d: int, table: torch.dtype, act: torch.dtype) -> Spec:
    """The spec of one mix kernel as triton_mix launches it at dim d."""
    t, a = "*" + TRITON_TYPES[table], "*" + TRITON_TYPES[act]
    ids, f32 = "*i64", "*fp32"
    types = {
        "mix_fwd": dict(x=a, rows=ids, offs=ids, gates=a, u=t, v=t, y=a, pre=f32, N="i32",
                        D="i32"),
        "mix_bwd_bags": dict(dy=a, rows=ids, offs=ids, gates=a, pre=f32, u=t, v=t, dx=a, dg=a,
                             ds=f32, ga=f32, N="i32", D="i32"),
        "row_grads": dict(x=a, dy=a, order=ids, bag=ids, roffs=ids, ds=f32, ga=f32, du=t, dv=t,
                          R="i32", P="i32", D="i32"),
    }[kernel]
    pl = triton_mix.plan(d, act if kernel == "row_grads" else table, kernel)
    consts = dict(pl.constexprs(), **({} if kernel == "row_grads" else {"GELU": True}))
    div = ("N",) + (("D",) if d % 16 == 0 else ())  # N = 1024^2 in the paper's tables
    return Spec(kernel, "peer_dist.ops.triton_kernels", d, TRITON_TYPES[table],
                TRITON_TYPES[act], tuple(types.items()),
                tuple(consts.items()), pl.num_warps, div, d / (pl.PARTS * pl.C * pl.CH))


def _optim_specs(d: int, table: torch.dtype) -> list[Spec]:
    """The row optimizers' specs at dim d (state in fp32, the default)."""
    pl = triton_mix.plan(d, table, "adam_rows")  # adagrad_rows: the same (the default)
    t = "*" + TRITON_TYPES[table]
    common = dict(p=t, rows="*i64")
    tail = dict(R="i32", D="i32")
    adam = dict(common, m="*fp32", v="*fp32", grad="*fp32", row_bc="*fp64", b1="fp32",
                c1="fp32", b2="fp32", c2="fp32", eps="fp32", step="fp32", ib2="fp32", **tail)
    ada = dict(common, acc="*fp32", grad="*fp32", lr="fp32", eps="fp32", **tail)
    active = d / (pl.PARTS * pl.C * pl.CH)
    div = ("D",) if d % 16 == 0 else ()
    mod = "peer_dist.ops.triton_kernels"
    name = TRITON_TYPES[table]
    return [Spec("adam_rows", mod, d, name, "fp32", tuple(adam.items()),
                 tuple((pl.constexprs() | {"PER_ROW": True}).items()), pl.num_warps, div,
                 active),
            Spec("adagrad_rows", mod, d, name, "fp32", tuple(ada.items()),
                 tuple(pl.constexprs().items()), pl.num_warps, div, active)]


def specs(d: int, table: torch.dtype, act: torch.dtype) -> list[Spec]:
    """Every kernel the project launches at dim d with these dtypes: the mix's three and the
    row optimizer's two (state in fp32)."""
    return [_mix_spec(k, d, table, act) for k in MIX_KERNELS] + _optim_specs(d, table)


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_spec(spec: Spec, arch: int):
    """triton.compile for sm_<arch> (Triton's own cache makes a repeat cheap)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    consts = dict(spec.constexprs)
    signature = dict(spec.types) | {k: "constexpr" for k in consts}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in spec.types
             if ty.startswith("*") or n in spec.divisible}
    if set(fn.arg_names) != set(signature):
        raise ValueError(f"{spec.kernel}: spec names {sorted(signature)}, the kernel takes "
                         f"{fn.arg_names}")
    signature = {n: signature[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps})


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def disassemble(cubin: str) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """Resource usage (REG, SHARED, LOCAL, STACK) and (address, opcode, operands) of each
    SASS instruction, from one cuobjdump run."""
    out = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", "-sass", cubin],
                         check=True, capture_output=True, text=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out)}
    insns = [(int(m.group(1), 16), m.group(3), m.group(4))
             for m in map(_INSN.search, out.splitlines()) if m]
    return res, insns


def is_row_load(op: str) -> bool:
    """Table-row loads are the kernels' only L2-only (.cg) loads: LDG...STRONG.GPU in the
    SASS (LDGSTS...BYPASS where a pipelined loop copies them asynchronously)."""
    return op.startswith("LDG") and ("STRONG.GPU" in op or
                                     (op.startswith("LDGSTS") and "BYPASS" in op))




def _width(op: str) -> int:
    """Bits a lane loads in one LDG / LDGSTS."""
    for tag, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8),
                      (".S8", 8)):
        if tag in op:
            return bits
    return 32


def _regs(text: str) -> list[int]:
    return [int(r) for r in re.findall(r"\bR(\d+)\b", text)]


def _dest(op: str, operands: str) -> list[int]:
    """Registers a load writes (a 128-bit load writes 4 from its first)."""
    first = _regs(operands.split(",")[0])
    return [first[0] + i for i in range(max(1, _width(op) // 32))] if first else []


def _sources(operands: str) -> set[int]:
    parts = operands.split(",")
    if parts and "[" in parts[0]:  # a store: every operand is read
        return set(_regs(operands))
    return set(_regs(",".join(parts[1:])))


def analyse(insns) -> dict:
    """Row-load widths, bits per lane issued before the first wait, loop barriers."""
    loads = [op for _, op, _ in insns if is_row_load(op)]
    pending: set[int] = set()
    lane_bits = 0
    for _, op, operands in insns:  # from the first row load on, in address order
        waits = op.startswith(("BAR", "DEPBAR")) or _sources(operands) & pending
        if lane_bits and waits:
            break
        if is_row_load(op):
            lane_bits += _width(op)
            # an async copy (LDGSTS, the pipelined loops) is waited for at DEPBAR
            pending |= set() if op.startswith("LDGSTS") else set(_dest(op, operands))
    barriers = late = 0
    for lo, hi in _loops(insns):
        body = [op for a, op, _ in insns if lo <= a <= hi]
        bars = [i for i, op in enumerate(body) if op.startswith("BAR")]
        barriers += len(bars)
        late += sum(1 for op in body[bars[0]:] if is_row_load(op)) if bars else 0
    return dict(row_load_bits=min(map(_width, loads), default=0), row_loads=len(loads),
                inflight_lane_bits=lane_bits, loop_barriers=barriers,
                loads_after_barrier=late)


def _loops(insns) -> list[tuple[int, int]]:
    """(first, last) address of each loop: the span of a backward branch."""
    spans = []
    for a, op, operands in insns:
        m = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < a:
            spans.append((int(m.group(1), 16), a))
    return spans


def occupancy(arch: int, regs: int, shared: int, warps: int) -> int:
    """Programs an SM holds: registers are allocated per warp in 256s (8 a lane)."""
    sm = SM[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (sm["regs"] // per_warp) // warps
    by_smem = sm["smem"] // (shared + 1024)
    return max(0, min(by_regs, by_smem, sm["warps"] // warps, sm["blocks"]))


def needed_per_sm(gpu: str, latency_ns: float) -> int:
    """Bytes in flight an SM needs to keep HBM busy: bandwidth x latency / SMs."""
    return int(HBM[gpu] * latency_ns * 1e-9 / SMS)


def measure(spec: Spec, arch: int, latency_ns: float) -> dict:
    """One row of the table."""
    k = compile_spec(spec, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res, insns = disassemble(cubin)
    info = analyse(insns)
    shared = int(k.metadata.shared)
    progs = occupancy(arch, res.get("REG", 0), shared, spec.num_warps)
    per_prog = int(info["inflight_lane_bits"] // 8 * 32 * spec.num_warps * spec.active)
    consts = dict(spec.constexprs)
    return dict(kernel=spec.kernel, arch=f"sm_{arch}", d=spec.d, table_dtype=spec.table_dtype,
                act_dtype=spec.act_dtype, num_warps=spec.num_warps,
                tile=f"{consts.get('W')}x{consts.get('C')}x{consts.get('CH')}",
                parts=consts.get("PARTS", 1), registers=res.get("REG", 0),
                spill_bytes=res.get("LOCAL", 0) + res.get("STACK", 0), shared_bytes=shared,
                programs_per_sm=progs, row_load_bits=info["row_load_bits"],
                row_loads=info["row_loads"], loop_barriers=info["loop_barriers"],
                loads_after_barrier=info["loads_after_barrier"],
                inflight_bytes=per_prog, inflight_bytes_per_sm=per_prog * progs,
                inflight_needed_bytes_per_sm=needed_per_sm("H200", latency_ns),
                inflight_needed_h100_bytes_per_sm=needed_per_sm("H100", latency_ns))


def grid(dims, dtypes, archs) -> list[tuple[Spec, int]]:
    """Every (spec, arch) of the table; tables and activations in the same dtype."""
    return [(spec, arch) for d in dims for name in dtypes
            for spec in specs(d, DTYPES[name], DTYPES[name]) for arch in archs]


def _job(job) -> dict:
    spec, arch, latency_ns = job
    return measure(spec, arch, latency_ns)


def _compiler_process() -> None:
    """Worker start: the kernels defined for compiling, not for the interpreter (the tests'
    process runs them under TRITON_INTERPRET=1)."""
    os.environ.pop("TRITON_INTERPRET", None)


def compiler_pool(workers: int):
    """`workers` fresh processes that compile. They start with Ctrl-C ignored (an ignored
    signal stays ignored in a new interpreter), so a Ctrl-C while they import torch prints no
    traceback of theirs: this process takes it, and leaving the pool's block terminates them."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(workers, initializer=_compiler_process)
    finally:
        signal.signal(signal.SIGINT, old)


def measure_all(jobs, latency_ns: float, workers: int, progress=None) -> list[dict]:
    """Rows of every (spec, arch), compiled in `workers` fresh processes, in jobs' order."""
    args = [(spec, arch, latency_ns) for spec, arch in jobs]
    with compiler_pool(workers) as pool:
        rows = []
        for i, row in enumerate(pool.imap(_job, args)):
            rows.append(row)
            if progress:
                progress(i + 1, len(args))
        return rows


COLUMNS = ("kernel", "arch", "d", "table_dtype", "act_dtype", "num_warps", "tile", "parts",
           "registers", "spill_bytes", "shared_bytes", "programs_per_sm", "row_load_bits",
           "loop_barriers", "loads_after_barrier", "inflight_bytes", "inflight_bytes_per_sm",
           "inflight_needed_bytes_per_sm")


def _ints(p: argparse.ArgumentParser, text: str, name: str, allowed) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or any(v not in allowed for v in vals):
        p.error(f"{name}={text!r} is invalid: allowed are comma-separated values in "
                f"{allowed[0]}..{allowed[-1]}" if isinstance(allowed, range) else
                f"{name}={text!r} is invalid: allowed are {list(allowed)}, comma-separated")
    return list(dict.fromkeys(vals))  # a repeat would compile and print the same rows again


def parse(argv: list[str]) -> argparse.Namespace:
    p = cli.Parser(prog="peer-bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default=",".join(map(str, DIMS)))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16")
    p.add_argument("--archs", default="80,90", help="80 (sm_80), 90 (sm_90)")
    p.add_argument("--latency-ns", type=cli.floats(0, MAX_LATENCY_NS, above=True),
                   default=600.0, help="HBM latency assumed (ns)")
    p.add_argument("--jobs", type=cli.ints(1, MAX_JOBS),
                   default=max(1, min(4, os.cpu_count() or 1)),
                   help=f"compiler processes (at most {MAX_JOBS})")
    p.add_argument("--json", action="store_true", help="one JSON object per line and row")
    args = p.parse_args(argv)
    args.dims = _ints(p, args.dims, "--dims", range(1, triton_mix.MAX_DIM + 1))
    args.archs = _ints(p, args.archs, "--archs", ARCHS)
    names = [d.strip() for d in args.dtypes.split(",")]
    if any(d not in DTYPES for d in names):
        p.error(f"--dtypes={args.dtypes!r} is invalid: allowed are {list(DTYPES)}, "
                "comma-separated")
    args.dtypes = list(dict.fromkeys(names))
    if not triton_mix.installed():
        p.error("triton is not installed here: allowed is an environment with peer_dist[gpu]")
    return args


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    jobs = grid(args.dims, args.dtypes, args.archs)

    def progress(done: int, total: int) -> None:
        if done % 8 == 0 or done == total:
            print(f"peer-bench kernels: {done}/{total} compiled", file=sys.stderr)

    rows = measure_all(jobs, args.latency_ns, args.jobs, progress)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(table(rows))
    h100, h200 = (needed_per_sm(g, args.latency_ns) for g in ("H100", "H200"))
    print(f"\nIn flight needed per SM (Little's law, {args.latency_ns:.0f} ns assumed, 132 "
          f"SMs): H100 SXM {h100} B, H200 {h200} B. A static estimate from the cubin, not a "
          "speed: GPU speed is measured by launch/gpu_check.sh on a GPU.")


if __name__ == "__main__":
    main()
