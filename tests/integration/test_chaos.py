"""peer-chaos, the short version: the driver injects faults at random steps into a real
2-rank run, and the final state must equal an uninterrupted run's bit for bit. The soak
(`peer-chaos --faults 20`) is a command people run; here two faults."""

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


def test_chaos_run_survives_and_is_bit_exact(runs, tmp_path):
    runs.get(1, "train.steps=1")  # prepares runs.data once
    seed = next(s for s in range(100) if make_plan(2, random.Random(s)) ==
                ["preempt", "kill_rank"])
    proc = subprocess.run([sys.executable, "-m", "peer_dist.tools.chaos", "--config", str(TINY),
                           "--faults", "2", "--ckpt-every", "3", "--seed", str(seed),
                           "--run-dir", str(tmp_path), "--data", str(runs.data), "--json"],
                          cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=2 * TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["faults_injected"] == result["faults_survived"] == 2
    assert result["bit_exact"] is True
    assert [f["kind"] for f in result["faults"]] == ["preempt", "kill_rank"]
    assert result["faults"][0]["redone"] == 0  # the preempted run saved where it stopped
    assert 0 <= result["max_steps_redone"] <= result["checkpoint_interval"] == 3
    assert "verdict PASS" in proc.stdout
