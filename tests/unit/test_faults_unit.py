"""The pieces behind fault handling, in one process: the skip policy, where a non-finite value
is reported, the optimizer no-op of a skipped step, BatchNorm statistics restored, history kept
on resume, config differences, the run-directory lock, the fault-injection parser, and random
config values that must give a config or the one-line ConfigError, never another exception."""

from __future__ import annotations

import json
import math
import signal
import string
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer_dist.config import ConfigError, load_config, to_dict
from peer_dist.errors import UserError
from peer_dist.train import faults
from peer_dist.train.metrics import keep_history
from peer_dist.train.nonfinite import (
    NonFiniteError,
    SkipTracker,
    first_nonfinite,
    optimizer_step_skipped,
    restore_running_stats,
    running_stats,
)
from peer_dist.train.startup import RunDirLock, config_diff

NAN = float("nan")


def test_first_nonfinite_names_the_loss_before_gradients():
    assert first_nonfinite(1.0, 2.0, {"a": 1.0}, "") is None
    assert first_nonfinite(NAN, NAN, {"a": NAN}, "w") == "the loss"
    assert first_nonfinite(1.0, math.inf, {"a": 1.0, "b": NAN}, "embed.weight") == (
        "dense gradient (embed.weight), table gradient of b")
    assert first_nonfinite(1.0, 1.0, {"a": math.inf}, "") == "table gradient of a"


def test_skip_tracker_stops_after_max_consecutive_skips():
    t = SkipTracker("skip", max_skipped=3)
    assert t.record(1, "the loss") and t.record(2, None) is False and t.streak == 0
    assert t.record(3, "x") and t.record(4, "y")
    with pytest.raises(NonFiniteError, match=r"step 5: 3 consecutive .* the first, step 3, in x"):
        t.record(5, "z")
    assert t.total == 4


def test_skip_tracker_stop_policy_stops_at_once():
    with pytest.raises(NonFiniteError, match=r"step 7: non-finite value in the loss"):
        SkipTracker("stop", max_skipped=10).record(7, "the loss")


def test_optimizer_step_skipped_changes_no_weight_or_state():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.full((3,), 2.0)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    before = w.detach().clone()
    with optimizer_step_skipped(opt):
        opt.step()
    assert torch.equal(w, before)
    assert all(torch.equal(state[k], opt.state[w][k]) for k in state)
    opt.step()  # the method is back
    assert not torch.equal(w, before)


def test_running_stats_are_restored():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    saved = running_stats(model)
    assert set(saved) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    model(torch.full((8, 4), NAN))
    assert torch.isnan(model[1].running_mean).all()
    restore_running_stats(model, saved)
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert int(model[1].num_batches_tracked) == 0


def test_keep_history_drops_steps_after_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    rows.append({"kind": "val", "step": 4, "val_loss": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    keep_history(path, 2, redo_final=False)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keep_history(path, 4, redo_final=True)  # the final evaluation runs again
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in kept] == [("train", s) for s in (1, 2, 3, 4)]


def test_config_diff_lists_dotted_keys():
    a = to_dict(load_config(None, []))
    b = to_dict(load_config(None, ["optim.lr=2e-3", "model.peer.topk=8"]))
    assert config_diff(a, b) == [("model.peer.topk", 16, 8), ("optim.lr", 1e-3, 2e-3)]
    assert config_diff(a, a) == []


def test_run_dir_lock_is_exclusive_and_released(tmp_path):
    first, second = RunDirLock(tmp_path / "run"), RunDirLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(UserError, match=r"is in use by a live job \(pid \d+ on "):
        second.acquire()
    first.release()
    second.acquire()  # free again once the holder is gone
    second.release()


def test_fault_spec_is_parsed_and_fires_once(monkeypatch):
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("PEER_FAULT", "nan_loss@1:3,hang@0")
    assert not faults.armed("nan_loss", 0, 3) and not faults.armed("nan_loss", 1, 2)
    assert faults.armed("nan_loss", 1, 3) and not faults.armed("nan_loss", 1, 3)
    monkeypatch.setenv("PEER_FAULT", "explode@1")
    with pytest.raises(ValueError, match="allowed is <point>@<rank>"):
        faults.armed("hang", 1, 1)


# --------------------------------------------------------------------------- random configs

def _dotted_keys() -> list[str]:
    out = []

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out.append(f"{prefix}{k}")

    walk("", to_dict(load_config(None, [])))
    return out


VALUES = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30), st.floats(allow_nan=True),
    st.booleans(), st.text(alphabet=string.printable, max_size=12),
    st.sampled_from(["3e-4", "1e3", "nan", "-inf", "[1, 2]", "{a: 1}", "[", "!!python/none",
                     "1_000", "0x10", "~", "''", "middle", "all", "0,1", "gelu", "skip"]),
    st.lists(st.floats(allow_nan=False, width=32), max_size=3))
KEY = st.one_of(st.sampled_from(_dotted_keys()),
                st.text(alphabet=string.ascii_lowercase + "._", min_size=1, max_size=15))


def _as_override(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEY, VALUES), min_size=1, max_size=4))
def test_random_overrides_give_a_config_or_one_line_error(pairs):
    overrides = [f"{k}={_as_override(v)}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg
        return
    assert cfg.validate() is cfg  # what loaded is valid


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "train", "optim", "data", "parallel", "x"]),
                       st.one_of(VALUES, st.dictionaries(
                           st.sampled_from(["dim", "lr", "steps", "peer", "ep", "path", "y"]),
                           VALUES, max_size=3)), max_size=3),
       st.text(max_size=40))
def test_random_yaml_files_give_a_config_or_one_line_error(tmp_path_factory, data, junk):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    for text in (yaml.safe_dump(data), junk):
        path.write_text(text)
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e) and "\n" not in str(e)


HUNG_RANK = """
import os, signal, sys, time
from peer_dist.train.preempt import Control
c = Control(hung_after_s=float(sys.argv[1]))
c.install()
for _ in range(3):  # three step boundaries 0.05 s apart: the longest gap is 0.05 s
    c.vote(rank=1)
    time.sleep(0.05)
print("boundaries", flush=True)
if sys.argv[2] == "boundary":  # a healthy rank reaches its next boundary after the signal
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    c.vote(rank=1)
    time.sleep(1.0)
    print("alive", c.received == signal.SIGTERM, flush=True)
    sys.exit(0)
os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
time.sleep(30)  # hung: never reaches another boundary
print("not ended", flush=True)
"""


@pytest.mark.parametrize("case", ["hung", "boundary"])
def test_signalled_rank_without_a_boundary_ends_itself(case):
    """A rank that reaches no step boundary within hung_after_s (+ the longest gap seen) of a
    stop signal ends itself with SIGKILL instead of holding the launcher for its grace period;
    one that reaches its boundary lives on to save."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HUNG_RANK, "0.3", case], capture_output=True,
                          text=True, timeout=60)
    took = time.monotonic() - t0
    if case == "hung":
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
        assert "not ended" not in proc.stdout
        assert took < 20, took  # 0.35 s after the signal, start-up included; not the 30 s sleep
    else:
        assert proc.returncode == 0, proc.stderr
        assert "alive True" in proc.stdout
