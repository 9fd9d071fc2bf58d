"""peer-chaos, the short version: the driver injects faults at random steps into a real
2-rank run, and the final state must equal an uninterrupted run's bit for bit (here one made
on forked ranks, handed over with --reference). The soak (`peer-chaos --faults 20`) is a
command people run; here two faults: a preemption (the job stopped by SIGTERM, relaunched)
and a rank SIGKILLed mid-run, which torchrun's agent restarts (--max-restarts): the restarted
ranks resume from the newest checkpoint, the steps after it run again, the history keeps each
step once and every step's loss is the uninterrupted run's."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from train_cli_helpers import ROOT, TIMEOUT, TINY, env

from peer_dist.tools.chaos import KINDS, make_plan


def test_plan_holds_every_kind_and_arms_kill_in_ckpt_at_a_job_start():
    for seed in range(20):
        for n in (1, 2, 4, 7, 20):
            plan = make_plan(n, random.Random(seed))
            assert len(plan) == n
            if n >= len(KINDS):
                assert set(plan) == set(KINDS), plan
            for i, kind in enumerate(plan):
                assert kind != "kill_in_ckpt" or i == 0 or plan[i - 1] in ("preempt", "damage")


def test_damage_hits_a_table_shard_else_the_dense_weights(tmp_path):
    """A model without PEER tables (MoE, PKM, peer_blocks=none) writes empty shards: flipping
    a byte in the middle of one was an IndexError traceback after the reference run."""
    from peer_dist.tools.chaos import damage_newest

    step = tmp_path / "checkpoints" / "step_00000004"
    (step / "tables").mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp"):
        (step / "tables" / name).write_bytes(b"")
    (step / "dense_full.pt").write_bytes(bytes(8))
    assert damage_newest(tmp_path) == "step_00000004/dense_full.pt"
    assert (step / "dense_full.pt").read_bytes() == bytes(4) + b"\xff" + bytes(3)
    (step / "tables" / "__1_0.distcp").write_bytes(bytes(4))
    assert damage_newest(tmp_path) == "step_00000004/tables/__1_0.distcp"
    assert (step / "tables" / "__1_0.distcp").read_bytes() == bytes(2) + b"\xff" + bytes(1)


# peer-chaos's runs (2 faults, a checkpoint every 3 steps: (2 + 2) x 2 x 3 = 24 steps); the
# reference is made here on forked ranks and handed over with --reference
REFERENCE = ("train.steps=24", "train.log_every=1", "train.ckpt_every=3", "train.keep_last=3")


def chaos(tmp_path, data, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer_dist.tools.chaos", "--config", str(TINY),
                           "--faults", "2", "--ckpt-every", "3", "--run-dir", str(tmp_path),
                           "--data", str(data), "--json", *extra],
                          cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=2 * TIMEOUT)


def test_a_reference_of_other_settings_is_refused_in_one_line(runs, tmp_path, capsys):
    from peer_dist.tools import chaos as tool

    other = runs.get(2, "train.steps=24", "train.log_every=1", "train.ckpt_every=4",
                     "train.keep_last=3")
    args = ["--config", str(TINY), "--faults", "2", "--ckpt-every", "3", "--run-dir",
            str(tmp_path), "--data", str(runs.data), "--reference"]
    assert tool.main([*args, str(other["run_dir"])]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peer-chaos: --reference {other['run_dir']}: another config (train.ckpt_every=4 there "
        "vs 3 here)")
    assert tool.main([*args, str(tmp_path / "none")]) == 2
    assert "no finished run of 24 steps there" in capsys.readouterr().err
    assert tool.main([*args, str(other["run_dir"]), "--nproc", "3"]) == 2
    assert "it ran on 2 ranks, this run on --nproc 3" in capsys.readouterr().err


def test_chaos_run_survives_and_is_bit_exact(runs, tmp_path):
    reference = runs.get(2, *REFERENCE)
    seed = next(s for s in range(100) if make_plan(2, random.Random(s)) ==
                ["preempt", "kill_rank"])
    proc = chaos(tmp_path, runs.data, "--seed", str(seed), "--reference",
                 str(reference["run_dir"]))
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["faults_injected"] == result["faults_survived"] == 2
    assert result["bit_exact"] is True
    assert [f["kind"] for f in result["faults"]] == ["preempt", "kill_rank"]
    assert result["faults"][0]["redone"] == 0  # the preempted run saved where it stopped
    assert 0 <= result["max_steps_redone"] <= result["checkpoint_interval"] == 3
    assert "verdict PASS" in proc.stdout
    # the restart after the kill: from the newest checkpoint at or before the killed step
    kill = result["faults"][1]
    assert kill["resumed_from"] % 3 == 0 and 0 < kill["resumed_from"] <= kill["at_step"]
    # the steps run twice are logged once, each with the uninterrupted run's loss
    rows = [json.loads(line) for line in
            (tmp_path / "chaos" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train" and "loss" in r]
    assert steps == list(range(1, 25))
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train" and "loss" in r}
    assert losses == reference["losses"]
