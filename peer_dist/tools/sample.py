"""peer-sample: text from a trained model.

    peer-sample --checkpoint runs/tiny --prompt "def main(" --tokens 200
    peer-sample --checkpoint runs/tiny --prompt "import " --temperature 0.8 --top-k 40 --seed 1
    peer-sample --checkpoint runs/tiny --prompt "class " --nproc 2     # tables sharded, 2 ranks
    peer-sample --checkpoint model.safetensors --prompt "for "         # a peer-export file

Greedy by default (--temperature 0); otherwise softmax(logits / temperature) over the --top-k
most likely tokens (0 = all), drawn with --seed. The context is the last model.max_seq_len
tokens; generation stops after --tokens tokens or at the end-of-document token.

One process loads the whole model (the tables gathered). With --nproc N (or under torchrun)
every rank holds only its rows of each table, as in training (EP = the world): each rank runs
the same forward, the expert rows are reached by the training strategies' all-to-all, and rank 0
chooses each token and sends it to the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from peer_dist import cli
from peer_dist.config import Config
from peer_dist.errors import UserError, debug

PROG = "peer-sample"


# --------------------------------------------------------------------------- sampling

def next_token(logits: torch.Tensor, temperature: float, top_k: int,
               generator: torch.Generator | None, vocab: int | None = None) -> int:
    """One token id from the last position's logits (V,): argmax when temperature is 0. Only
    ids below `vocab` (the tokenizer's) are drawn: a model.vocab_size above the tokenizer's
    has ids no text maps to."""
    logits = logits.double()  # a temperature below float32's range (1e-300) stays nonzero
    if vocab is not None and vocab < logits.numel():
        logits = logits[:vocab]
    if temperature <= 0:
        return int(logits.argmax())
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # the largest logit at 0 first: a tiny temperature divides the others to -inf, not inf/inf
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], tokens: int, max_len: int,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             eos_id: int | None = None, agree=None, vocab: int | None = None) -> list[int]:
    """prompt + up to `tokens` new ids. `agree(token) -> token` makes every rank take rank 0's
    choice (sharded models); the forward itself is the same call on every rank."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(tokens):
        x = torch.tensor([ids[-max_len:]], device=device)  # (1, T)
        logits = model(x)[0, -1]  # (V,)
        tok = next_token(logits, temperature, top_k, gen, vocab)
        tok = agree(tok) if agree else tok
        ids.append(tok)
        if eos_id is not None and tok == eos_id:
            break
    return ids


def load_tokenizer_of(cfg: Config, spec: str | None = None):
    """The tokenizer the training data was prepared with (byte unless meta.json says else)."""
    from peer_dist.data.tokenizers import ByteTokenizer, HFTokenizer
    from peer_dist.tools.export import tokenizer_spec

    given = spec
    spec = spec or tokenizer_spec(cfg)
    if spec == "byte":
        if not given and cfg.model.vocab_size != ByteTokenizer.vocab_size and not (
                Path(cfg.data.path) / "meta.json").is_file():
            raise UserError(
                f"the model's tokenizer is not known here: data.path={cfg.data.path!r}, whose "
                "meta.json names it, is not found from this folder (a relative path is read "
                f"from the folder you run in), and its vocabulary of {cfg.model.vocab_size} is "
                "not the byte tokenizer's 256; allowed: the folder training ran in, or "
                "--tokenizer FILE (the tokenizers JSON the data was prepared with)")
        tok = ByteTokenizer()
    else:
        try:
            tok = HFTokenizer(spec)
        except (OSError, ImportError, ValueError) as e:
            where = "--tokenizer" if given else f"the tokenizer of data.path={cfg.data.path!r}"
            raise UserError(f"{where}: {e}") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer {spec!r} has {tok.vocab_size} ids, the model "
                        f"{cfg.model.vocab_size}: allowed is the tokenizer the model was trained "
                        "with (--tokenizer FILE)")
    return tok


# --------------------------------------------------------------------------- loading

def load_single(spec: str) -> tuple[Config, torch.nn.Module]:
    """The whole model in this process: from a peer-export file or a checkpoint."""
    from peer_dist.tools.export import load_exported, load_from_checkpoint

    return load_exported(spec) if spec.endswith(".safetensors") else load_from_checkpoint(spec)


def load_sharded(spec: str) -> tuple[Config, torch.nn.Module, object]:
    """This rank's part of the model, tables sharded over the world as in training (every rank
    calls this under an initialised process group); returns (cfg, model, topology)."""
    import torch.distributed.checkpoint as dcp

    from peer_dist.model.transformer import build_model
    from peer_dist.parallel import Topology, expert_shards, parallelize
    from peer_dist.parallel.parallelize import shard_dtensors
    from peer_dist.tools.export import checkpoint_config, resolve_checkpoint
    from peer_dist.train.checkpoint import verify, without_unsaved_buffers

    path = resolve_checkpoint(spec)
    problem = verify(path)  # collective: every rank gets the same answer
    if problem is not None:
        raise UserError(f"checkpoint {str(path)!r} {problem}", all_ranks=True)
    cfg = checkpoint_config(path)
    cfg.parallel.ep = 0  # the whole world holds one copy of the tables
    topo = Topology.build(0)
    model = parallelize(build_model(cfg.model, cfg.train.seed, materialize=False), topo,
                        cfg.parallel).to(topo.device)
    dense = torch.load(path / "dense_full.pt", weights_only=True, map_location=topo.device)
    model.load_state_dict(without_unsaved_buffers(dense, model), strict=True)
    tables = {f"{s.name}.{side}": t for s in expert_shards(model)
              for side, t in shard_dtensors(s, topo).items()}
    dcp.load(tables, checkpoint_id=str(path / "tables"))  # this rank's rows, in place
    return cfg, model.eval(), topo


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__.split("\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/ folder, "
                   "step_* directory, or a .safetensors file from peer-export")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--tokens", type=cli.ints(0, cli.MAX_COUNT), default=100,
                   help="new tokens at most (default 100)")
    p.add_argument("--temperature", type=cli.floats(0), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=cli.ints(0), default=0,
                   help="sample among the k likeliest; 0 = all")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="the tokenizers JSON the data was prepared with, or byte (default: the "
                        "one in the training data.path)")
    p.add_argument("--seed", type=cli.ints(0, 2 ** 63 - 1), default=0,
                   help="random seed of the draws (default 0)")
    p.add_argument("--nproc", type=cli.ints(1), default=1,
                   help="ranks on this node, tables sharded over them (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids and text)")
    return p


def arg_error(args: argparse.Namespace) -> str | None:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes the shell passed that are not UTF-8 text
        return (f"--prompt holds bytes that are not UTF-8 text (at character {e.start}): "
                "allowed is UTF-8 text")
    if args.nproc > 1 and args.checkpoint.endswith(".safetensors"):
        return "--nproc > 1 shards a checkpoint's tables: allowed is --checkpoint <run or step>"
    return None


def rank_args(args: argparse.Namespace) -> list[str]:
    """The ranks' command line: this one without --nproc, each value attached with '=' (so
    torchrun's own parser, which reads the line first, cannot take one for its options)."""
    out = [f"--checkpoint={args.checkpoint}", f"--prompt={args.prompt}",
           f"--tokens={args.tokens}", f"--temperature={args.temperature}",
           f"--top-k={args.top_k}", f"--seed={args.seed}"]
    out += [f"--tokenizer={args.tokenizer}"] if args.tokenizer else []
    return out + (["--json"] if args.json else [])


def sample(args: argparse.Namespace) -> dict:
    """Generate per args in this process (one rank, or one of the ranks under torchrun)."""
    import torch.distributed as dist

    sharded = "RANK" in os.environ
    if sharded:
        from peer_dist.parallel.topology import init_distributed

        init_distributed()
        cfg, model, topo = load_sharded(args.checkpoint)

        def agree(tok: int) -> int:
            t = torch.tensor([tok], device=topo.device)
            dist.broadcast(t, src=0)
            return int(t)
    else:
        cfg, model = load_single(args.checkpoint)
        agree = None
    tok = load_tokenizer_of(cfg, args.tokenizer)
    prompt = [int(i) for i in tok.encode(args.prompt)]
    if not prompt:  # start from the end-of-document token, as after a document
        prompt = [tok.eos_id if tok.eos_id is not None else 0]
    t0 = time.perf_counter()
    ids = generate(model, prompt, args.tokens, cfg.model.max_seq_len, args.temperature,
                   args.top_k, args.seed, tok.eos_id, agree, tok.vocab_size)
    new = ids[len(prompt):]
    if sharded:
        dist.barrier()  # no rank leaves while another still needs it
    return {"prompt": args.prompt, "ids": new, "text": new_text(tok, new),
            "seconds": time.perf_counter() - t0, "ranks": dist.get_world_size() if sharded else 1}


def new_text(tok, new: list[int]) -> str:
    """The generated ids as text; the end-of-document token that stopped them is not text (it
    printed a NUL byte)."""
    end = new and tok.eos_id is not None and new[-1] == tok.eos_id
    return tok.decode(new[:-1] if end else new)


def launch_env_error(env) -> str | None:
    """torchrun's variables set by hand or left in the shell (RANK alone made this process a
    rank of a job that does not exist: a traceback), as peer-train checks them."""
    from peer_dist.train.__main__ import env_error

    if "RANK" in env and "WORLD_SIZE" not in env:
        return (f"RANK={env['RANK']!r} without WORLD_SIZE: allowed are both (torchrun sets "
                "them), or neither (unset RANK; --nproc N starts the ranks)")
    return env_error(dict(env))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_intermixed_args(argv)
    problem = arg_error(args) or launch_env_error(os.environ)
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "RANK" not in os.environ:
        from peer_dist.train.__main__ import launch
        from peer_dist.train.startup import local_ranks_error

        problem = local_ranks_error(args.nproc)
        if problem:
            print(f"{PROG}: {problem}", file=sys.stderr)
            return 2
        from peer_dist.tools.export import checkpoint_config, resolve_checkpoint

        try:  # what every rank would find alike, found here once (each rank printed it)
            load_tokenizer_of(checkpoint_config(resolve_checkpoint(args.checkpoint)),
                              args.tokenizer)
        except UserError as e:
            if debug():
                raise
            print(f"{PROG}: {e}", file=sys.stderr)
            return e.exit_code

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return launch(["--standalone", f"--nproc-per-node={args.nproc}", "-m",
                       "peer_dist.tools.sample", *rank_args(args)])
    from peer_dist.tools.export import quiet_env

    quiet_env()
    rank = int(os.environ.get("RANK", "0"))
    try:
        out = sample(args)
    except UserError as e:
        if debug():
            raise
        if e.should_print(rank):
            print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        _close_group()
    if rank == 0:
        if args.json:
            print(json.dumps(out))
        else:
            print(args.prompt + out["text"])
            print(f"{PROG}: {len(out['ids'])} tokens in {out['seconds']:.1f} s on "
                  f"{out['ranks']} rank(s)", file=sys.stderr)
    return 0


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
