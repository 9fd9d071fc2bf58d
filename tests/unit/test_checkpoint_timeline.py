"""Checkpoint retention and resume cannot lose progress or mix timelines: a hypothesis state
machine drives random sequences of save, re-save of the same step, damage to a file, a kill at
every stage of a write, restart with train.resume=auto, and keep_last 1-3, on the real
filesystem functions (commit, recover, find_resume, start_timeline, prune). A model tracks
which checkpoints exist and which are intact; after every step a restart must pick the newest
valid checkpoint of the current timeline and `latest` must name an existing one."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from peer_dist.config import load_config
from peer_dist.train import checkpoint as ckpt


class Killed(Exception):
    """A kill at a stage of commit (the process stops there)."""


def write_tmp(root: Path, step: int, complete: bool = True) -> None:
    """A small checkpoint in `.tmp_step_<step>`: what save_checkpoint leaves before commit."""
    tmp = root / f".tmp_{ckpt.step_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tables").mkdir(parents=True)
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    (tmp / "tables" / "u.bin").write_bytes(bytes(range(256)) * 4)
    if complete:
        ckpt.write_manifest(tmp)


class Timeline(RuleBasedStateMachine):
    @initialize(keep_last=st.integers(1, 3))
    def start(self, keep_last):
        self.dir = Path(tempfile.mkdtemp())
        self.cfg = load_config(None, [f"train.run_dir={self.dir}", "train.resume=auto",
                                      f"train.keep_last={keep_last}"])
        self.root = ckpt.checkpoint_root(self.cfg)
        self.root.mkdir(parents=True)
        self.keep = keep_last
        self.present: dict[int, bool] = {}  # step -> intact, as the model expects
        self.step, self.alive = 0, True

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def _keep_newest(self):
        steps = sorted(self.present)
        for s in steps[:-self.keep]:
            del self.present[s]

    @precondition(lambda self: self.alive)
    @rule(advance=st.integers(0, 3))
    def save(self, advance):
        """Train `advance` steps and save (0: save the current step again, a replacement)."""
        if self.step + advance == 0:
            return
        self.step += advance
        write_tmp(self.root, self.step)
        ckpt.commit(self.root, self.step, self.keep)
        self.present[self.step] = True
        self._keep_newest()

    @precondition(lambda self: self.alive)
    @rule(advance=st.integers(0, 3),
          stage=st.sampled_from(["files", "aside", "renamed", "latest"]))
    def kill_during_write(self, advance, stage):
        """The process dies while writing checkpoint step+advance, at `stage`."""
        new = self.step + advance
        if new == 0:
            return
        if stage == "aside" and new not in self.present:
            return self.save(advance)  # nothing to move aside: no kill point at that stage
        self.alive = False
        if stage == "files":
            write_tmp(self.root, new, complete=False)
            return
        write_tmp(self.root, new)

        def crash(at):
            if at == stage:
                raise Killed

        with pytest.raises(Killed):
            ckpt.commit(self.root, new, self.keep, crash=crash)
        if stage != "aside":  # the new one is in place: it survives, unpruned
            self.present[new] = True

    @precondition(lambda self: any(self.present.values()))
    @rule(data=st.data(), how=st.sampled_from(["flip", "truncate", "no_manifest"]))
    def damage(self, data, how):
        step = data.draw(st.sampled_from(sorted(s for s, ok in self.present.items() if ok)))
        d = self.root / ckpt.step_name(step)
        f = d / "tables" / "u.bin"
        if how == "flip":
            b = bytearray(f.read_bytes())
            b[7] ^= 0xFF
            f.write_bytes(bytes(b))
        elif how == "truncate":
            f.write_bytes(f.read_bytes()[:-3])
        else:
            (d / ckpt.MANIFEST).unlink()
            (d / "meta.json").unlink()
        self.present[step] = False

    @rule()
    def restart(self):
        """A new process: resume=auto, then continue the timeline from what it loaded."""
        found = ckpt.find_resume(self.cfg, log=lambda line: None)
        resumed = ckpt.step_of(found) if found is not None else 0
        ckpt.start_timeline(self.root, resumed, log=lambda line: None)
        self.present = {s: ok for s, ok in self.present.items() if s <= resumed}
        self.step, self.alive = resumed, True
        assert sorted(s for s in self.present) == sorted(
            ckpt.step_of(p) for p in self.root.glob("step_*"))
        if resumed:
            assert (self.root / ckpt.LATEST).read_text().strip() == ckpt.step_name(resumed)

    @invariant()
    def resume_takes_newest_valid_of_this_timeline(self):
        if not hasattr(self, "root"):
            return
        found = ckpt.find_resume(self.cfg, log=lambda line: None)  # also recovers a kill
        valid = [s for s, ok in self.present.items() if ok]
        assert (ckpt.step_of(found) if found else None) == (max(valid) if valid else None)
        on_disk = {ckpt.step_of(p) for p in self.root.glob("step_*")}
        assert on_disk == set(self.present)
        pointer = self.root / ckpt.LATEST
        if pointer.exists():
            named = pointer.read_text().strip()
            assert (self.root / named).is_dir(), f"latest names missing {named}"
            if self.present.get(ckpt.step_of(self.root / named)):
                assert ckpt.verify(self.root / named) is None
        else:
            assert not self.present, "checkpoints but no latest"


TestTimeline = Timeline.TestCase
TestTimeline.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_fallback_then_save_keeps_the_new_checkpoint(tmp_path):
    """The reported loss: with keep_last=1, resume falls back from a damaged step_200 to
    step_100; the next save (step_110) must survive and step_200 must never be resumed."""
    cfg = load_config(None, [f"train.run_dir={tmp_path}", "train.keep_last=1"])
    root = ckpt.checkpoint_root(cfg)
    root.mkdir(parents=True)
    for step in (100, 200):
        write_tmp(root, step)
        ckpt.commit(root, step, keep_last=2)
    (root / "step_00000200" / "tables" / "u.bin").write_bytes(b"damaged")
    lines = []
    found = ckpt.find_resume(cfg, log=lines.append)
    assert found == root / "step_00000100" and "step_00000200" in lines[0]
    moved = ckpt.start_timeline(root, 100, log=lines.append)
    assert moved == ["step_00000200"] and "abandoned" in lines[-1]
    write_tmp(root, 110)
    ckpt.commit(root, 110, keep_last=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000110"]
    assert (root / ckpt.LATEST).read_text().strip() == "step_00000110"
    assert ckpt.find_resume(cfg, log=lines.append) == root / "step_00000110"
    assert (root / ckpt.ABANDONED / "step_00000200").is_dir()  # moved aside, not deleted


@pytest.mark.parametrize("stage", ["aside", "renamed", "latest"])
def test_replacing_a_step_is_atomic(tmp_path, stage):
    root = tmp_path / "checkpoints"
    root.mkdir()
    write_tmp(root, 5)
    ckpt.commit(root, 5, keep_last=2)
    write_tmp(root, 5)

    def crash(at):
        if at == stage:
            raise Killed

    with pytest.raises(Killed):
        ckpt.commit(root, 5, keep_last=2, crash=crash)
    ckpt.recover(root)
    assert ckpt.verify(root / "step_00000005") is None
    assert not list(root.glob(".old_*"))
