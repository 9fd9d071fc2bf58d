"""The main job on CPU: the rank side of peer-train on 1-4 forked ranks (as torchrun runs it),
two torchrun agents as two nodes, and the command line's own errors.

Base run: configs/tiny.yaml, 8 steps, 2 ranks x 4 sequences, checkpoints at steps 4 and 8,
gradient clipping active (the early norms exceed 1), so clipping, the LR schedule and both
optimizers are inside every comparison.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import pytest
import torch
from train_cli_helpers import (
    ROOT,
    TINY,
    check,
    env,
    free_port,
    peer_train,
    read_run,
    train_ranks,
)

from peer_dist.train.checkpoint import read_full_state

BASE = ("train.ckpt_every=4", "train.keep_last=3")
LOSS_TOL = 2e-5  # relative; float32 sums in a different order across layouts


def assert_losses_close(a: dict, b: dict, steps=None) -> None:
    steps = steps or sorted(a)
    for s in steps:
        assert b[s] == pytest.approx(a[s], rel=LOSS_TOL), f"step {s}: {a[s]} vs {b[s]}"


def assert_states_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f"{k}: max |diff| {diff}"


def ckpt(run: dict, step: int):
    return run["run_dir"] / "checkpoints" / f"step_{step:08d}"


def test_two_ranks_lower_the_loss_and_report(runs):
    r = runs.get(2, *BASE)
    losses = r["losses"]
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0, losses
    s = r["summary"]
    assert s["world_size"] == 2 and s["steps"] == 8 and s["val_ppl"] > 1
    assert len(s["expert_mib_per_rank"]) == 2 and min(s["expert_mib_per_rank"]) > 0
    assert "=== summary ===" in r["log"] and "ETA" in r["log"]
    # the exchange the expert layers use is said at the start, what ran logged per window
    assert "peer-train: expert tables: EP 2, exchange auto (the cost model's choice" in r["log"]
    ran = [k.rsplit("/", 1)[1] for row in r["rows"] for k in row if "/strategy/" in k]
    assert ran and set(ran) <= {"fetch", "dispatch", "node_dispatch"}, ran
    usage = [v for k, v in s["experts"].items() if k.endswith("/usage")]
    assert usage and 0 < usage[0] <= 1
    rows = r["rows"]
    assert any("comm/" in k for row in rows for k in row), "all-to-all stats not logged"
    assert any("memory/rank1/peak_rss_mib" in row for row in rows)
    assert list((r["run_dir"] / "tb").glob("events.out.tfevents.*"))


# The ZeRO-1 run also evaluates every 3 steps (one launch for both): evaluation in the middle
# of a run must leave training as it was (BatchNorm back in training mode, no data or RNG used)
MID_EVAL = "train.eval_every=3"


def zero_run(runs, stage: int) -> dict:
    extra = (MID_EVAL,) if stage == 1 else ()
    return runs.get(2, *BASE, f"train.zero_stage={stage}", *extra)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_give_the_same_losses(runs, stage):
    base = runs.get(2, *BASE)
    run = zero_run(runs, stage)
    assert_losses_close(base["losses"], run["losses"])
    assert "Warning" not in run["log"]  # ZeRO's deprecated collectives: 2-4 lines per rank


def test_mid_run_evaluation(runs):
    """Validation at steps 3 and 6 (eval_every=3) and the final one at 8, each with loss,
    perplexity and expert usage; the steps after an evaluation train as without one."""
    r = zero_run(runs, 1)
    val = [row for row in r["rows"] if row["kind"] == "val"]
    assert [row["step"] for row in val] == [3, 6, 8]
    for row in val:
        assert row["val_loss"] > 0 and row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        usage = [v for k, v in row.items() if k.startswith("experts/") and k.endswith("/usage")]
        assert len(usage) == 1 and 0 < usage[0] <= 1
    assert val[0]["val_loss"] > val[-1]["val_loss"]  # the model learned in between
    assert r["summary"]["val_ppl"] == pytest.approx(val[-1]["val_ppl"])
    assert_losses_close(runs.get(2, *BASE)["losses"], r["losses"], steps=[4, 5, 7, 8])


def test_bf16_trains_as_fp32_does(runs):
    """train.dtype=bf16 (what auto picks on a GPU): with the query BatchNorm per rank (the
    plain BatchNorm's path) it died in the first backward, and with it synchronised at the
    final evaluation; now the losses follow fp32's within bf16's rounding, evaluation
    included, and the run ends with its checkpoint."""
    r = runs.get(2, *BASE, "train.dtype=bf16", "train.zero_stage=2", "parallel.bn_sync=local",
                 MID_EVAL)
    fp32 = runs.get(2, *BASE)["losses"]
    assert sorted(r["losses"]) == list(range(1, 9))
    for step in (1, 4, 8):
        assert r["losses"][step] == pytest.approx(fp32[step], rel=0.03), (step, r["losses"])
    assert [row["step"] for row in r["rows"] if row["kind"] == "val"] == [3, 6, 8]
    assert "bfloat16" in r["log"] and (ckpt(r, 8) / "manifest.json").is_file()


def test_a_checkpoint_resumes_in_another_dtype(runs, tmp_path):
    """Resumed with train.dtype changed, the engine's own checkpoint did not load
    (`its dense state cannot be loaded (KeyError: 'dynamic_loss_scale')`, blaming an intact
    checkpoint): now the weights load in the new dtype, the dense optimizer starts afresh
    (said), and the change is named."""
    src = runs.get(2, *BASE, "train.dtype=bf16", "train.zero_stage=2", "parallel.bn_sync=local",
                   MID_EVAL)
    out = train_ranks(2, tmp_path / "fp32", [*BASE, "train.zero_stage=2", "train.steps=10",
                                             "parallel.bn_sync=local", MID_EVAL,
                                             f"train.resume={ckpt(src, 8)}"], runs.data)
    assert "ZeRO 2, bf16; loading at 2, ZeRO 2, fp32: dense weights restored" in out["log"]
    assert "train.dtype 'bf16' -> 'auto'" in out["log"]
    assert sorted(out["losses"]) == [9, 10]
    assert abs(out["losses"][9] - src["losses"][8]) < 0.5  # went on, not from scratch


def test_sharded_two_ranks_match_one_rank(runs):
    """1 rank x 8 sequences (peer-train, no torchrun) == 2 ranks x 4 sequences."""
    single = runs.get(1, *BASE, "train.batch_size=8")
    assert single["summary"]["world_size"] == 1
    assert_losses_close(single["losses"], runs.get(2, *BASE)["losses"])


def test_grad_accum_matches_larger_micro_batch(runs):
    """2 micro-batches of 2 == 1 of 4: dense and table gradients follow the same 1/G scale.
    (The query BatchNorm is off: its batch statistics depend on the micro-batch size.)"""
    no_bn = (*BASE, "model.peer.query_batchnorm=false")
    acc = runs.get(2, *no_bn, "train.batch_size=2", "train.grad_accum=2")
    whole = runs.get(2, *no_bn)
    assert_losses_close(whole["losses"], acc["losses"])
    # validation over the same held-out sequences (train.eval_batches global batches): it took
    # eval_batches x world size micro-batches, half the sequences here, and another loss
    val = [r["summary"]["val_loss"] for r in (whole, acc)]
    assert val[1] == pytest.approx(val[0], rel=LOSS_TOL)


def test_resume_matches_uninterrupted_run(runs, tmp_path):
    """A run stopped after its step-4 checkpoint and resumed (resume=auto) == uninterrupted."""
    full = runs.get(2, *BASE)
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt(full, 4), run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")
    resumed = train_ranks(2, run_dir, list(BASE), runs.data)
    assert "resumed from" in resumed["log"]
    assert sorted(resumed["losses"]) == [5, 6, 7, 8]
    assert_losses_close(full["losses"], resumed["losses"], steps=[5, 6, 7, 8])
    assert_states_equal(read_full_state(ckpt(full, 8)),
                        read_full_state(run_dir / "checkpoints" / "step_00000008"))


@pytest.mark.parametrize("nproc,written,stage", [(1, 3, 0), (3, 3, 3), (4, 0, 0)])
def test_checkpoint_reshards_to_other_world_sizes(runs, tmp_path, nproc, written, stage):
    """Written at world 2 (ZeRO `written`), loaded at world 1/3/4 (ZeRO `stage`): identical
    tables, table optimizer state and dense weights (the loaded run saves again without
    training). A ZeRO-3 checkpoint saved the rotary tables (non-persistent buffers), which
    every other stage refused as unexpected keys (and so did peer-sample and peer-export)."""
    src = runs.get(2, *BASE) if written == 0 else zero_run(runs, written)
    out = train_ranks(nproc, tmp_path / "loaded", [*BASE, f"train.resume={ckpt(src, 8)}",
                                                   f"train.zero_stage={stage}"], runs.data)
    assert out["summary"]["world_size"] == nproc
    before = read_full_state(ckpt(src, 8))
    after = read_full_state(tmp_path / "loaded" / "checkpoints" / "step_00000008")
    assert any(k.startswith("tables.") and k.endswith(".u") for k in before)
    assert_states_equal(before, after)


def test_two_torchrun_agents_train_together(runs, tmp_path):
    """--nnodes=2 on 127.0.0.1 (c10d rendezvous), one rank each == the 2-rank standalone run."""
    port = free_port()
    run_dir = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=itest",
           "-m", "peer_dist.train", "--config", str(TINY), f"train.run_dir={run_dir}",
           f"data.path={runs.data}", *BASE]
    runs.get(2, *BASE)  # the data folder exists before two agents start
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for a in agents:
        out, _ = a.communicate(timeout=240)
        check(subprocess.CompletedProcess(a.args, a.returncode, out))
    nodes = read_run(run_dir)
    assert nodes["summary"]["world_size"] == 2
    assert_losses_close(runs.get(2, *BASE)["losses"], nodes["losses"])


def test_bad_override_fails_with_a_clear_message(tmp_path):
    proc = subprocess.run([*peer_train(), "--config", str(TINY), "train.zero_stage=5"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.zero_stage=5" in proc.stderr and "[0, 1, 2, 3]" in proc.stderr


def test_full_state_reader_sees_table_shapes(runs):
    state = read_full_state(ckpt(runs.get(2, *BASE), 8))
    u = next(v for k, v in state.items() if k.startswith("tables.") and k.endswith(".u"))
    assert u.shape == (1024, 64) and torch.isfinite(u).all()


@pytest.mark.parametrize("kind", ["moe", "pkm"])
def test_baseline_layers_train_in_the_sharded_trainer(runs, kind):
    """MoE (with its load-balancing loss) and PKM are dense modules: 2 ranks, ZeRO 2, EP = 2
    (only PEER tables would be sharded) train and lower the loss like PEER does."""
    r = runs.get(2, *BASE, f"model.sparse_kind={kind}", "model.moe.experts=4",
                 "model.moe.topk=2", "train.zero_stage=2", "parallel.ep=2")
    losses = r["losses"]
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0, losses
    assert r["summary"]["val_ppl"] > 1 and max(r["summary"]["expert_mib_per_rank"]) == 0
    assert (f"expert tables: none to shard (model.sparse_kind={kind}: its layers are replicated "
            "on every rank); parallel.ep, strategy and overlap_chunks have no effect") in r["log"]
