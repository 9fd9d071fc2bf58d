"""Resuming: the global batch kept at any world size, the LR schedule continued (never sent
back up) when train.steps grows, and one line for each thing that changed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from peer_dist.config import load_config, save_config
from peer_dist.errors import UserError
from peer_dist.train.resume import Schedule, global_batch, on_resume, resolve_batch


def test_global_batch_derives_accumulation_or_refuses():
    cfg = load_config(None, ["train.global_batch_size=16", "train.batch_size=2"])
    resolve_batch(cfg, world=4)
    assert cfg.train.grad_accum == 2 and global_batch(cfg, 4) == 16
    cfg = load_config(None, ["train.global_batch_size=16", "train.batch_size=2"])
    resolve_batch(cfg, world=1)
    assert cfg.train.grad_accum == 8 and global_batch(cfg, 1) == 16
    cfg = load_config(None, ["train.global_batch_size=12", "train.batch_size=4"])
    with pytest.raises(UserError, match=r"global_batch_size=12 cannot be split over 2 ranks.*"
                                        r"multiples of 8"):
        resolve_batch(cfg, world=2)
    cfg = load_config(None, ["train.grad_accum=3"])  # unset: nothing derived
    resolve_batch(cfg, world=2)
    assert cfg.train.grad_accum == 3


def ratios(s: Schedule, steps, warmup=10, min_ratio=0.1):
    return [s.ratio(t, warmup, min_ratio) for t in steps]


def test_fresh_schedule_is_warmup_then_cosine():
    s = Schedule(10, 1.0, 100)
    r = ratios(s, range(101))
    assert r[0] == pytest.approx(0.1) and r[9] == pytest.approx(1.0)
    assert r[10] == pytest.approx(1.0) and r[55] == pytest.approx(0.55) and r[100] == 0.1
    assert all(a >= b for a, b in zip(r[10:], r[11:], strict=False))


def checkpoint(tmp_path, step, world, ep, overrides, schedule=None):
    cfg = load_config(None, overrides)
    save_config(cfg, tmp_path / "config.yaml")
    meta = {"step": step, "world_size": world, "ep": ep}
    if schedule:
        meta["lr_schedule"] = schedule
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_longer_run_continues_from_the_current_lr(tmp_path):
    """The issue's case: a finished 100-step run raised to 200 steps. The LR must not go
    back up: it starts where it was (base * min_ratio at the end) and stays there."""
    path = checkpoint(tmp_path, 100, 1, 1, ["train.steps=100", "optim.lr=1e-3"])
    cfg = load_config(None, ["train.steps=200", "optim.lr=1e-3"])
    topo = SimpleNamespace(world_size=1, ep=1)
    schedule, notes = on_resume(path, 100, cfg, topo)
    assert len(notes) == 1 and "train.steps 100 -> 200" in notes[0]
    r = ratios(schedule, range(100, 201))
    assert r[0] == pytest.approx(0.1) and max(r) == pytest.approx(0.1)
    # mid-run: resumed at step 50 of 100 with 150 steps now: no jump, then down to the min
    path = checkpoint(tmp_path, 50, 1, 1, ["train.steps=100"])
    cfg = load_config(None, ["train.steps=150"])
    schedule, _ = on_resume(path, 50, cfg, topo)
    before = Schedule(10, 1.0, 100).ratio(50, 10, 0.1)
    r = ratios(schedule, range(50, 151))
    assert r[0] == pytest.approx(before) and r[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(r, r[1:], strict=False))
    # recompute: the 150-step schedule as if it had always been
    cfg = load_config(None, ["train.steps=150", "optim.resume_schedule=recompute"])
    schedule, notes = on_resume(path, 50, cfg, topo)
    assert schedule == Schedule(10, 1.0, 150) and "recompute" in notes[0]


def test_a_saved_segment_is_kept_when_nothing_changed(tmp_path):
    path = checkpoint(tmp_path, 120, 2, 2, ["train.steps=200"],
                      schedule={"start": 100, "start_ratio": 0.1, "total": 200})
    cfg = load_config(None, ["train.steps=200"])
    schedule, notes = on_resume(path, 120, cfg, SimpleNamespace(world_size=2, ep=2))
    assert schedule == Schedule(100, 0.1, 200) and notes == []


def test_world_size_and_global_batch_changes_are_said(tmp_path):
    path = checkpoint(tmp_path, 4, 2, 2, ["train.batch_size=4", "train.steps=8"])
    cfg = load_config(None, ["train.batch_size=4", "train.steps=8"])
    _, notes = on_resume(path, 4, cfg, SimpleNamespace(world_size=4, ep=4))
    assert notes == [
        "peer-train: resume: world size 2 -> 4: the tables were resharded from EP 2 to EP 4",
        "peer-train: resume: global batch 8 -> 16 sequences a step (set "
        "train.global_batch_size=8 to keep it at any world size)"]
    cfg = load_config(None, ["train.batch_size=2", "train.global_batch_size=8", "train.steps=8"])
    resolve_batch(cfg, 4)
    _, notes = on_resume(path, 4, cfg, SimpleNamespace(world_size=4, ep=4))
    assert len(notes) == 2 and "resharded" in notes[0]  # the same global batch: no line
    assert notes[1] == ("peer-train: resume: changed since the checkpoint, taken as given now: "
                        "train.batch_size 4 -> 2, train.global_batch_size 0 -> 8")


def test_a_grad_accum_that_the_global_batch_replaces_is_said():
    cfg = load_config(None, ["train.global_batch_size=8", "train.batch_size=4",
                             "train.grad_accum=3"])
    assert resolve_batch(cfg, 1) == (
        "peer-train: train.grad_accum=3 replaced by 2: train.global_batch_size=8 sets it (1 rank "
        "x train.batch_size=4 x 2)")
    assert cfg.train.grad_accum == 2
    assert resolve_batch(cfg, 1) is None  # given as it is derived: nothing replaced
    cfg = load_config(None, ["train.global_batch_size=8", "train.batch_size=4"])
    assert resolve_batch(cfg, 2) is None and cfg.train.grad_accum == 1


def test_a_world_size_change_says_what_happened_to_the_tables(tmp_path):
    """It said `world size 2 -> 2: ... resharded from EP 2 to EP 1` for a change of EP alone,
    `from EP 1 to EP 1`, and resharded tables a MoE model does not have."""
    base = ["train.steps=8", "train.global_batch_size=32"]
    path = checkpoint(tmp_path, 4, 2, 2, base)
    for extra, world, ep, want in (
            ([], 2, 1, "the tables were resharded from EP 2 to EP 1"),
            ([], 4, 2, "world size 2 -> 4: the tables keep their EP 2 shards"),
            ([], 4, 4, "world size 2 -> 4: the tables were resharded from EP 2 to EP 4"),
            (["model.sparse_kind=moe"], 4, 4, "world size 2 -> 4")):
        cfg = load_config(None, [*base, *extra])
        resolve_batch(cfg, world)
        _, notes = on_resume(path, 4, cfg, SimpleNamespace(world_size=world, ep=ep))
        assert notes[0] == f"peer-train: resume: {want}", notes


def test_every_other_change_since_the_checkpoint_is_said(tmp_path):
    """A resume with another data.path, seed, sequence length or LR trained on without a
    word (the README promises a line for each thing that differs)."""
    path = checkpoint(tmp_path, 4, 1, 1, ["train.steps=8", "optim.lr=0.003"])
    cfg = load_config(None, ["train.steps=8", "optim.lr=0.1", "train.seed=99",
                             "data.path=/elsewhere", "train.seq_len=16", "train.run_dir=/r",
                             "train.resume=" + str(path)])
    _, notes = on_resume(path, 4, cfg, SimpleNamespace(world_size=1, ep=1))
    assert notes == ["peer-train: resume: changed since the checkpoint, taken as given now: "
                     "data.path 'data/stdlib' -> '/elsewhere', optim.lr 0.003 -> 0.1, "
                     "train.seed 1234 -> 99, train.seq_len 128 -> 16"]


def test_a_checkpoint_past_the_steps_says_there_is_nothing_to_train(tmp_path):
    """train.steps below the checkpoint's step printed an LR for a step that never runs."""
    path = checkpoint(tmp_path, 8, 1, 1, ["train.steps=8"])
    cfg = load_config(None, ["train.steps=4"])
    _, notes = on_resume(path, 8, cfg, SimpleNamespace(world_size=1, ep=1))
    assert notes == ["peer-train: resume: train.steps 8 -> 4: the checkpoint is at step 8, at "
                     "or past it: nothing to train (evaluated, and saved as it is)"]
