"""peer-export and peer-sample on a checkpoint of the real 2-rank run (the session's cached base
run of test_train_cli.py, so no extra training): the exported model computes the validation
loss the sharded trainer reported, and sampling on 2 ranks (tables sharded) draws the tokens the
single-process model draws."""

from __future__ import annotations

import json
import subprocess
import sys

import forkranks
import pytest
import torch
from train_cli_helpers import ROOT, check, env

from peer_dist.data import TokenDataset
from peer_dist.model.transformer import lm_loss
from peer_dist.tools import sample as sample_tool
from peer_dist.tools.export import load_exported, load_from_checkpoint
from peer_dist.tools.sample import generate, load_tokenizer_of

BASE = ("train.ckpt_every=4", "train.keep_last=3")  # test_train_cli.py's base run


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=240)
    check(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout + proc.stderr))
    return proc


@torch.no_grad()
def _val_loss(cfg, model) -> float:
    """The trainer's final evaluation, in one process: every validation batch it read."""
    t = cfg.train
    data = TokenDataset(cfg.data.path)
    total, tokens = 0.0, 0
    for x, y in data.eval_batches(t.batch_size, t.seq_len, "val", max_batches=t.eval_batches * 2):
        total += float(lm_loss(model(x), y)) * y.numel()
        tokens += y.numel()
    return total / tokens


def test_exported_model_gives_the_checkpoint_logits(runs, tmp_path):
    run = runs.get(2, *BASE)
    out = tmp_path / "model.safetensors"
    proc = _cli("peer_dist.tools.export", "--checkpoint", str(run["run_dir"]), "--out", str(out))
    assert "step 8" in proc.stdout and (tmp_path / "model.yaml").is_file()
    cfg, exported = load_exported(out)
    _, direct = load_from_checkpoint(run["run_dir"])
    x = torch.randint(0, cfg.model.vocab_size, (3, cfg.train.seq_len),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(x), direct(x))
    # the sharded 2-rank model's own validation loss at step 8, from the run's summary
    assert _val_loss(cfg, exported) == pytest.approx(run["summary"]["val_loss"], rel=1e-5)


def test_sampling_on_two_ranks_draws_what_one_process_draws(runs, tmp_path):
    """The ranks' side of `peer-sample ... --nproc 2` (the command line its launcher hands
    them, run on forked ranks; the launcher is peer-train's, tested through its CLI)."""
    run = runs.get(2, *BASE)
    args = ["--checkpoint", str(run["run_dir"]), "--prompt", "def f(", "--tokens", "12",
            "--temperature", "1.0", "--top-k", "20", "--seed", "3", "--json", "--nproc", "2"]
    argv = sample_tool.rank_args(sample_tool.build_parser().parse_intermixed_args(args))
    assert "--nproc" not in " ".join(argv) and all("=" in a for a in argv if a != "--json")
    log = tmp_path / "ranks.log"
    code = forkranks.train(2, argv, log, env(), 240, module="peer_dist.tools.sample")
    out = log.read_text()
    assert code == 0, out[-3000:]
    two = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    cfg, model = load_from_checkpoint(run["run_dir"])
    tok = load_tokenizer_of(cfg)
    prompt = [int(i) for i in tok.encode("def f(")]
    one = generate(model, prompt, 12, cfg.model.max_seq_len, 1.0, 20, 3, tok.eos_id)
    assert two["ranks"] == 2 and two["ids"] == one[len(prompt):]
    assert len(set(two["ids"])) > 1  # drawn, not one repeated token
