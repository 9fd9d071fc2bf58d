"""peer-launch: turn the cluster's environment into the right launch of peer-train.

    peer-launch --config configs/peer_1m.yaml            # in a container, a SLURM step, a pod
    peer-launch --dry-run --config configs/tiny.yaml     # print the command, run nothing

One torchrun agent per node (peer-train runs torchrun's launcher itself, so a failed rank ends
in one line). The environment decides the layout, first match wins:

  slurm       SLURM_JOB_ID set: nodes SLURM_NNODES, this node SLURM_NODEID, rendezvous on the
              first host of SLURM_JOB_NODELIST (or MASTER_ADDR), id SLURM_JOB_ID; one task per
              node (srun --ntasks-per-node=1)
  pytorchjob  Kubeflow's PyTorchJob: PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK /
              PET_MASTER_ADDR / PET_MASTER_PORT (set with nprocPerNode), or, in a pod
              (KUBERNETES_SERVICE_HOST), MASTER_ADDR / MASTER_PORT / WORLD_SIZE (pods) / RANK
  c10d        MASTER_ADDR and NNODES > 1 (MASTER_PORT, NODE_RANK, RDZV_ID optional)
  single      anything else: one node

Ranks per node: NPROC, else the scheduler's GPU count, else the visible GPUs, else 2 (CPU).
Rendezvous port: MASTER_PORT, default 29400. Restarts: MAX_RESTARTS (default 3 under SLURM and
PyTorchJob, else 0). Without --config, configs/small.yaml.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from peer_dist.errors import UserError

DEFAULT_PORT = 29400
STYLES = ("slurm", "pytorchjob", "c10d", "single")


@dataclass
class Layout:
    style: str
    nnodes: int
    nproc: int
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = DEFAULT_PORT
    rdzv_id: str = "peer_dist"
    max_restarts: int = 0


MAX_NODES = 65536  # beyond these a value is a typo, not a cluster
MAX_RANKS_PER_NODE = 1024
MAX_RESTARTS = 10_000


def _int(env: Mapping[str, str], key: str, default: int | None = None, low: int = 1,
         high: int | None = None) -> int:
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"{key} is not set: allowed is {allowed}")
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        raise UserError(f"{key}={raw!r} is invalid: allowed is {allowed}")
    return value


def _nodes(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    return _int(env, key, default, high=MAX_NODES)


def _restarts(env: Mapping[str, str], default: int) -> int:
    return _int(env, "MAX_RESTARTS", default, low=0, high=MAX_RESTARTS)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    m = re.match(r"\s*([^,\[\]]+)(?:\[([^\]]+)\])?\s*(?:,|$)", nodelist)
    if not m or not m.group(1):
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} is invalid: allowed is a SLURM host "
                        "list such as node[01-04] or node1,node2")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _gpus_here() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _nproc(env: Mapping[str, str], *scheduler_keys: str) -> int:
    for key in ("NPROC", *scheduler_keys):
        raw = env.get(key, "").split("(")[0].strip()  # SLURM_GPUS_ON_NODE may read "8(x2)"
        if raw in ("auto", "gpu"):  # torchrun's words, as PyTorchJob may pass them on
            if _gpus_here() or raw == "auto":
                return _gpus_here() or 2
            raise UserError(f"{key}=gpu but no GPU is visible: allowed is an integer >= 1")
        if raw == "cpu":
            return os.cpu_count() or 1
        if raw:
            return _int({key: raw}, key, high=MAX_RANKS_PER_NODE)
    return _gpus_here() or 2


NODE_RANK_KEYS = {"slurm": "SLURM_NODEID", "pytorchjob": "PET_NODE_RANK or RANK",
                  "c10d": "NODE_RANK", "single": "NODE_RANK"}


def detect(env: Mapping[str, str]) -> Layout:
    """The launch layout this environment describes (see the module docstring), checked: a
    node rank past the last node is an error here, not a rendezvous that never completes."""
    layout = _detect(env)
    if layout.node_rank >= layout.nnodes:
        raise UserError(f"{NODE_RANK_KEYS[layout.style]}={layout.node_rank} with "
                        f"{layout.nnodes} node(s): allowed is a node rank from 0 to "
                        f"{layout.nnodes - 1}")
    return layout


def _detect(env: Mapping[str, str]) -> Layout:
    port = _int(env, "MASTER_PORT", DEFAULT_PORT, high=65535)
    if env.get("SLURM_JOB_ID"):
        tasks = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        if tasks not in ("", "1"):
            raise UserError(f"SLURM_NTASKS_PER_NODE={tasks}: peer-launch starts one agent per "
                            "node, which starts the ranks; allowed is 1 (srun "
                            "--ntasks-per-node=1)")
        nodes_key = "SLURM_NNODES" if env.get("SLURM_NNODES") else "SLURM_JOB_NUM_NODES"
        master = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", ""))
        return Layout("slurm", _nodes(env, nodes_key, 1), _nproc(env, "SLURM_GPUS_ON_NODE"),
                      _int(env, "SLURM_NODEID", 0, low=0), master, port, env["SLURM_JOB_ID"],
                      _restarts(env, 3))
    if env.get("PET_NNODES"):
        return Layout("pytorchjob", _nodes(env, "PET_NNODES"), _nproc(env, "PET_NPROC_PER_NODE"),
                      _int(env, "PET_NODE_RANK", _int(env, "RANK", 0, low=0), low=0),
                      env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR", ""),
                      _int(env, "PET_MASTER_PORT", port, high=65535),
                      env.get("PET_RDZV_ID") or "peer_dist",
                      _restarts(env, 3))
    if env.get("KUBERNETES_SERVICE_HOST") and env.get("MASTER_ADDR") and env.get("WORLD_SIZE"):
        return Layout("pytorchjob", _nodes(env, "WORLD_SIZE"), _nproc(env),
                      _int(env, "RANK", 0, low=0), env["MASTER_ADDR"], port, "peer_dist",
                      _restarts(env, 3))
    nodes = _nodes(env, "NNODES", 1)  # checked whether or not MASTER_ADDR is set
    if nodes > 1 and not env.get("MASTER_ADDR"):  # each node would run a job of its own
        raise UserError(f"NNODES={nodes} without MASTER_ADDR: allowed is MASTER_ADDR set to "
                        "node 0's address on every node (or NNODES unset for one node)")
    if nodes > 1:
        return Layout("c10d", nodes, _nproc(env), _int(env, "NODE_RANK", 0, low=0),
                      env["MASTER_ADDR"], port, env.get("RDZV_ID") or "peer_dist",
                      _restarts(env, 0))
    return Layout("single", 1, _nproc(env), _int(env, "NODE_RANK", 0, low=0),
                  max_restarts=_restarts(env, 0))


def with_config(train_args: list[str]) -> list[str]:
    """peer-train's arguments, with --config configs/small.yaml where they name no config."""
    if any(a == "--config" or a.startswith("--config=") for a in train_args):
        return list(train_args)
    return ["--config", "configs/small.yaml", *train_args]


def command(layout: Layout, train_args: list[str], python: str = "python") -> list[str]:
    """The peer-train command (torchrun's launcher flags) for this layout."""
    args = with_config(train_args)
    cmd = [python, "-m", "peer_dist.train", "--nproc", str(layout.nproc)]
    if layout.nnodes > 1:
        if not layout.master_addr:
            raise UserError(f"{layout.style}: {layout.nnodes} nodes but no rendezvous host: "
                            "allowed is MASTER_ADDR set to node 0's address")
        cmd += ["--nnodes", str(layout.nnodes), "--rdzv-endpoint",
                f"{layout.master_addr}:{layout.master_port}", "--rdzv-id", layout.rdzv_id]
    if layout.max_restarts:
        cmd += ["--max-restarts", str(layout.max_restarts)]
    return cmd + args


# peer-train's launcher flags: peer-launch sets them from the environment (the module's doc)
LAUNCHER_FLAGS = {"--nproc": "NPROC", "--nnodes": "NNODES, SLURM_NNODES or PET_NNODES",
                  "--rdzv-endpoint": "MASTER_ADDR and MASTER_PORT", "--rdzv-id": "RDZV_ID",
                  "--max-restarts": "MAX_RESTARTS"}


def check_train_args(train_args: list[str]) -> None:
    """Read the arguments passed through to peer-train as it will (its config and overrides),
    so a bad one is one line here, before any node starts torchrun, and in --dry-run too."""
    from peer_dist.config import ConfigError, load_config

    config, overrides = None, []
    args = iter(train_args)
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in LAUNCHER_FLAGS:
            raise UserError(f"{flag} is set by peer-launch from the environment "
                            f"({LAUNCHER_FLAGS[flag]}): allowed are --config FILE and dotted "
                            "overrides such as train.steps=10")
        if flag == "--config":
            config = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if not config:
                raise UserError("--config needs a file: allowed is --config FILE")
        elif arg.startswith("-"):
            raise UserError(f"{arg!r} is not an option of peer-train that peer-launch passes "
                            "through: allowed are --config FILE and dotted overrides such as "
                            "train.steps=10")
        else:
            overrides.append(arg)
    try:
        load_config(config, overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None


def launch_env(layout: Layout, env: Mapping[str, str]) -> dict[str, str]:
    out = dict(env)
    out.setdefault("OMP_NUM_THREADS", "1")
    if layout.nnodes > 1:
        # restarted workers must not read the failed attempt's addresses from a shared store
        out.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    try:
        layout = detect(os.environ)
        cmd = command(layout, argv, sys.executable if not dry else "python")
        check_train_args(with_config(argv))
    except UserError as e:
        print(f"peer-launch: {e}", file=sys.stderr)
        return 2
    env = launch_env(layout, os.environ)
    print(f"peer-launch: {layout.style}: {where(layout)}, {layout.nproc} ranks per node",
          file=sys.stderr)
    if dry:
        print(shown_command(cmd, env, os.environ))
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def where(layout: Layout) -> str:
    """This agent's place: with several nodes the rendezvous numbers them in arrival order, so
    the node rank given here need not be the one the job uses (each node's first rank prints
    the global ranks it runs)."""
    if layout.nnodes == 1:
        return "one node"
    return (f"started as node {layout.node_rank} of {layout.nnodes} (the rendezvous may number "
            "it otherwise)")


def shown_command(cmd: list[str], env: Mapping[str, str], parent: Mapping[str, str]) -> str:
    """The command as it will run: the variables the launch sets or changes, then the line."""
    added = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if parent.get(k) != v]
    return " ".join(["env", *added, *map(shlex.quote, cmd)] if added else map(shlex.quote, cmd))


if __name__ == "__main__":
    sys.exit(main())
