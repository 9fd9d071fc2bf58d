"""What a new user meets first, without starting ranks: the command line (options and
overrides in any order, launcher flags), the data checks, the layout checks, threads per rank,
the multi-node lines, and one metrics row per step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peer_dist.config import load_config
from peer_dist.errors import UserError
from peer_dist.train import startup
from peer_dist.train.__main__ import main, node_line, parse_args
from peer_dist.train.metrics import Logger

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_options_after_overrides_are_parsed():
    args = parse_args(["--config", "c.yaml", "train.steps=5", "--max-restarts", "2",
                       "train.run_dir=r", "--nproc", "3"])
    assert args.overrides == ["train.steps=5", "train.run_dir=r"]
    assert (args.config, args.max_restarts, args.nproc) == ("c.yaml", 2, 3)


@pytest.mark.parametrize("flag", [["--nproc", "0"], ["--nproc", "-2"], ["--nnodes", "0"]])
def test_bad_launcher_flags_are_one_line(capsys, flag, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # main sets it: restored after
    assert main(["--config", str(TINY), *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allowed are --nproc >= 1" in err[0]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # idle OpenMP threads sleep
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    main(["--config", str(TINY), *flag])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice is kept


@pytest.mark.parametrize("endpoint", [":99999", "node0:99999", "node0:0", "node0:", "h:x"])
def test_a_bad_rendezvous_endpoint_is_one_line(capsys, endpoint):
    """torchrun's own check of the port was a ValueError traceback."""
    assert main(["--config", str(TINY), "--nnodes", "2", "--rdzv-endpoint", endpoint]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"peer-train: --rdzv-endpoint={endpoint!r} is invalid: allowed is HOST or "
                   "HOST:PORT with a port from 1 to 65535 (e.g. node0:29400)"]


@pytest.mark.parametrize("env,message", [
    ({"RANK": "abc", "WORLD_SIZE": "1"}, "RANK='abc' is invalid: allowed is an integer >= 0"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 with WORLD_SIZE=2: allowed is a rank from 0 to 1"),
    ({"LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE='abc' is invalid"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is invalid"),
    ({"OMP_NUM_THREADS": "1" + "0" * 30}, "OMP_NUM_THREADS=1000"),
    ({"PEER_FAULT": "garbage"}, "PEER_FAULT item 'garbage' is invalid"),
])
def test_launcher_variables_no_launcher_would_set_are_one_line(capsys, monkeypatch, env,
                                                                message):
    """Each was a traceback (RANK=abc) or an internal error naming no variable (status 1)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["--config", str(TINY)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_folder_given_as_the_config_is_named_as_one(capsys, tmp_path):
    assert main(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder: allowed is a YAML file" in err[0], err


def test_more_ranks_than_this_machine_runs_is_one_line_before_any_start(capsys, monkeypatch):
    """CPU ranks: at most 8 per core (--nproc 100000 once started ranks until memory ran out);
    NCCL: one rank per GPU. peer-train, peer-sample, peer-bench dist and peer-scale's points
    refuse more before launching anything."""
    from peer_dist.parallel import topology
    from peer_dist.tools import bench_dist, sample

    monkeypatch.setattr(startup, "cpu_cores", lambda: 2)
    monkeypatch.setattr(topology, "pick_backend", lambda: "gloo")
    assert startup.local_ranks_error(16) is None
    assert startup.local_ranks_error(17) == (
        "--nproc=17: CPU ranks on this machine's 2 core(s): allowed is 1 to 16 (8 per core at "
        "most)")
    monkeypatch.setattr(topology, "pick_backend", lambda: "nccl")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    assert startup.local_ranks_error(8) is None
    assert "--nproc=9: this machine has 8 GPU(s)" in startup.local_ranks_error(9)
    monkeypatch.setattr(topology, "pick_backend", lambda: "gloo")
    for cli in (lambda: main(["--config", str(TINY), "--nproc", "17", "parallel.ep=1"]),
                lambda: sample.main(["--checkpoint", "runs/x", "--nproc", "17"])):
        assert cli() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--nproc=17: CPU ranks" in err[0], err
    with pytest.raises(SystemExit) as e:
        bench_dist.parse(["--nprocs-list", "1,17"])
    assert e.value.code == 2
    assert "--nprocs-list=17: CPU ranks" in capsys.readouterr().err


@pytest.mark.parametrize("name,world", [("tiny", 1), ("small", 2), ("million_cpu", 2),
                                        ("peer_1m", 1), ("peer_1m", 8)])
def test_least_bytes_per_rank_stay_under_the_memory_models_peak(name, world):
    """The start-up refusal must never refuse a config that fits: its bound is at most the
    memory model's whole peak (the measured one), and its tables are the model's exactly."""
    from peer_dist.tools import memory_model as mm

    cfg = load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml")
    cfg.model.vocab_size = cfg.model.vocab_size or 256
    least = startup.least_bytes_per_rank(cfg, world)
    ep = world if cfg.parallel.ep == 0 else cfg.parallel.ep
    peak = mm.breakdown(mm.Setup(cfg.model, ep=ep, world_size=world,
                                 table_dtype=cfg.model.peer.table_dtype,
                                 table_optimizer=cfg.optim.table_optimizer,
                                 zero_stage=cfg.train.zero_stage,
                                 tokens_per_rank=cfg.train.batch_size * cfg.train.seq_len))
    assert least["expert tables"] == peak["expert_params"]
    assert least["their optimizer state"] == peak["expert_optim"]
    assert 0 < sum(least.values()) <= peak["total"]


@pytest.mark.parametrize("override,part,hint", [
    ("model.peer.num_experts=4294967296", "(expert tables 1,024.0, their optimizer state 2,048.0",
     "optim.table_optimizer=adagrad"),
    ("train.batch_size=1000000", "(logits 30.5 GiB)", "train.batch_size"),
    ("model.vocab_size=1000000000", "(dense parameters 238.4", "model.vocab_size"),
    ("model.n_layers=1000000000000", "(dense parameters", "model.n_layers"),  # not a loop
])
def test_a_config_that_cannot_fit_is_one_line_before_any_start(capsys, monkeypatch, override,
                                                               part, hint):
    """model.peer.num_experts=2**32 ended in an allocator error naming no key; batch_size=1e6
    in the kernel's out-of-memory killer. Both launchers refuse it first (here: 8 GiB)."""
    monkeypatch.setattr(startup, "memory_per_rank",
                        lambda ranks: (8 * 1024 ** 3 // ranks, f"available over {ranks}"))
    for argv in (["--config", str(TINY), "--nproc", "2", override],  # tables over 2 ranks
                 ["--config", str(TINY), override]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "allowed: a smaller" in err[0] and hint in err[0], err
        assert part in err[0] or "--nproc" not in argv, err
    cfg = load_config(TINY)
    startup.check_memory(cfg, 1, 1)  # the tiny config fits


def test_missing_data_path_is_an_error_without_a_source(tmp_path: Path):
    cfg = load_config(TINY, [f"data.path={tmp_path / 'typo'}", "data.source="])
    with pytest.raises(UserError, match=r"does not exist; allowed: .*data.source=stdlib"):
        startup._prepare(cfg)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    cfg = load_config(TINY, [f"data.path={tmp_path / 'empty'}"])  # tiny names a source
    with pytest.raises(UserError, match="holds no prepared dataset") as e:
        startup._prepare(cfg)
    assert "--force" not in str(e.value)


def test_a_folder_prepared_from_other_settings_is_refused(tmp_path: Path, monkeypatch):
    """data.source set while data.path names a folder prepared from other text, tokenizer,
    split or cap trained on that folder without a word (the shipped configs name a source)."""
    from peer_dist.data import prepare

    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", val_fraction=0.1, max_bytes=10 ** 6,
            log=lambda m: None)
    same = [f"data.path={tmp_path / 'd'}", f"data.source={tmp_path / 'a.txt'}",
            "data.val_fraction=0.1", "data.max_bytes=1000000"]
    startup._prepare(load_config(TINY, same))  # the settings it was prepared with
    monkeypatch.chdir(tmp_path)
    startup._prepare(load_config(TINY, [*same, "data.source=a.txt"]))  # named from elsewhere
    startup._prepare(load_config(TINY, [*same, "data.source="]))  # the folder as it is
    for change, named in [
            ("data.source=stdlib", "data.source='stdlib' (it holds ["),
            ("data.source=a.txt,a.txt", "data.source='a.txt,a.txt'"),
            ("data.max_bytes=2000000", "data.max_bytes=2000000 (it holds 1000000)"),
            ("data.val_fraction=0.2", "data.val_fraction=0.2 (it holds 0.1)"),
            ("data.tokenizer=tok.json", "data.tokenizer='tok.json' (it holds 'byte')")]:
        with pytest.raises(UserError) as e:
            startup._prepare(load_config(TINY, [*same, change]))
        message = str(e.value)
        assert "\n" not in message and named in message, message
        assert message.startswith(f"data.path={str(tmp_path / 'd')!r} was prepared from other "
                                  "settings than ") and "data.source= (empty)" in message
    # a tokenizers JSON: the same file's bytes, wherever it lies, or another's
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta.update(tokenizer="tokenizer.json", tokenizer_source="/elsewhere/tok.json")
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "d" / "tokenizer.json").write_text('{"model": 1}')
    (tmp_path / "tok.json").write_text('{"model": 1}')
    startup._prepare(load_config(TINY, [*same, "data.tokenizer=tok.json"]))
    (tmp_path / "tok.json").write_text('{"model": 2}')
    for tok in ("tok.json", "byte", "missing.json"):
        with pytest.raises(UserError, match=f"data.tokenizer='{tok}' .it holds "
                                            "'/elsewhere/tok.json'"):
            startup._prepare(load_config(TINY, [*same, f"data.tokenizer={tok}"]))


def test_vocab_size_zero_takes_the_prepared_folders(tmp_path: Path):
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "meta.json").write_text(json.dumps({"vocab_size": 4000}))
    cfg = load_config(TINY, ["model.vocab_size=0", f"data.path={tmp_path / 'bpe'}"])
    assert cfg.model.vocab_size == 4000
    assert load_config(None, [f"data.path={tmp_path / 'none'}"]).model.vocab_size == 256  # bytes
    assert load_config(TINY, [f"data.path={tmp_path / 'bpe'}"]).model.vocab_size == 256  # set


def test_a_rank_without_table_rows_is_refused():
    assert startup.empty_shard_ranks(9, 4) == [3]  # blocks of 3 rows: 3 + 3 + 3 + 0
    assert startup.empty_shard_ranks(1024, 4) == []
    cfg = load_config(TINY, ["model.peer.num_experts=9", "model.peer.topk=3"])
    with pytest.raises(UserError, match=r"leaves EP rank 3 without a table row; allowed: "
                                        r"parallel.ep in \[1, 2\] at world size 4"):
        startup.check_layout(cfg, 4)
    startup.check_layout(cfg, 2)
    with pytest.raises(UserError, match="does not divide the world size 4"):
        startup.check_layout(load_config(TINY, ["parallel.ep=3"]), 4)
    startup.check_layout(load_config(TINY, ["model.sparse_kind=moe", "model.peer.num_experts=9",
                                            "model.peer.topk=3"]), 4)  # no PEER table


def test_a_query_batchnorm_of_one_token_is_refused_before_the_ranks():
    """It was found at the first forward, once per rank, and advised parallel.bn_sync=global on
    one rank, where it cannot help."""
    one = ["train.batch_size=1", "train.seq_len=1"]
    with pytest.raises(UserError, match=r"1 token per rank .* model.peer.query_batchnorm=false$"):
        startup.check_layout(load_config(TINY, one), 1)
    with pytest.raises(UserError, match=r"model.peer.query_batchnorm=false, or parallel.bn_sync"):
        startup.check_layout(load_config(TINY, [*one, "parallel.bn_sync=local"]), 2)
    with pytest.raises(UserError, match="1 token per rank"):
        startup.check_layout(load_config(TINY, [*one, "model.sparse_kind=pkm"]), 1)
    startup.check_layout(load_config(TINY, one), 2)  # statistics over both ranks' tokens
    for fine in (["model.peer.query_batchnorm=false"], ["model.sparse_kind=moe"],
                 ["train.seq_len=2"]):
        startup.check_layout(load_config(TINY, [*one, *fine]), 1)


def test_threads_share_the_cores_unless_set(monkeypatch):
    monkeypatch.setattr(startup, "cpu_cores", lambda: 8)
    cfg = load_config(TINY)
    assert startup.cpu_threads(cfg, 1, env={}) == 8
    assert startup.cpu_threads(cfg, 3, env={}) == 2
    assert startup.cpu_threads(cfg, 16, env={}) == 1
    assert startup.cpu_threads(cfg, 3, env={"OMP_NUM_THREADS": "5"}) == 5
    assert startup.cpu_threads(load_config(TINY, ["train.threads=3"]), 1,
                               env={"OMP_NUM_THREADS": "5"}) == 3


def test_each_node_says_which_global_ranks_it_runs():
    base = {"GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    first = node_line({**base, "RANK": "0", "GROUP_RANK": "0"})
    assert "global ranks 0-3" in first and "this node prints the job's progress" in first
    other = node_line({**base, "RANK": "4", "GROUP_RANK": "1"})
    assert "global ranks 4-7" in other and "global rank 0 is on another node" in other
    assert node_line({**base, "RANK": "5", "LOCAL_RANK": "1"}) is None
    assert "runs global rank 1;" in node_line({**base, "LOCAL_WORLD_SIZE": "1", "RANK": "1"})
    assert node_line({"RANK": "0", "LOCAL_RANK": "0"}) is None  # one node: nothing to say


def test_metrics_hold_one_row_per_step_and_kind(tmp_path: Path):
    log = Logger(tmp_path, 0, 4, 0)
    log.scalars(1, {"loss": 2.0})
    log.scalars(2, {"loss": 1.5})
    log.scalars(2, {"comm/x/bytes_sent": 10.0, "memory/rank0/peak_rss_mib": 5.0})
    log.scalars(2, {"val_loss": 1.7}, kind="val")
    log.scalars(3, {"loss": 1.2})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("val", 2),
                                                      ("train", 3)]
    assert rows[1] == {"kind": "train", "step": 2, "loss": 1.5, "comm/x/bytes_sent": 10.0,
                       "memory/rank0/peak_rss_mib": 5.0}


def test_the_data_line_names_tokens_vocabulary_and_threads(tmp_path: Path):
    from peer_dist.data import TokenDataset, prepare

    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", val_fraction=0.1, log=lambda m: None)
    cfg = load_config(TINY, [f"data.path={tmp_path / 'd'}", "train.seq_len=8"])
    line = startup.data_line(cfg, TokenDataset(tmp_path / "d"), 3)  # 10% of 2,400 B, + 1 EOS
    assert line == (f"peer-train: data {tmp_path / 'd'}: 2,161 train + 241 val tokens, "
                    "vocabulary 256 (byte tokenizer), model.vocab_size=256; 3 CPU threads per rank")


@pytest.mark.parametrize("env,ignored", [({"RANK": "1", "LOCAL_RANK": "1"}, True), ({}, False)])
def test_a_rank_leaves_ctrl_c_to_its_launcher_until_it_trains(env, ignored):
    """Ctrl-C to peer-train --nproc 2 reaches the ranks too: while they imported torch each
    printed a KeyboardInterrupt traceback (39-89 lines), once a C++ abort. A rank under torchrun
    now starts with SIGINT ignored (the agent stops it with SIGTERM); the loop's stop handlers
    take it once training starts (tests/integration/test_preempt.py)."""
    import subprocess
    import sys

    code = ("import runpy, signal, sys\nsys.argv = ['peer-train', '--help']\ntry:\n"
            "    runpy.run_module('peer_dist.train', run_name='__main__')\nexcept SystemExit:\n"
            "    pass\nprint(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == str(ignored), out.stderr


@pytest.mark.parametrize("made,named", [
    (lambda d: (d / "checkpoints").write_text(""), "'checkpoints' is a file"),
    (lambda d: (d / "tb").write_text(""), "'tb' is a file"),
    (lambda d: (d / "config.yaml").mkdir(), "'config.yaml' is a folder"),
    (lambda d: (d / "checkpoints" / "latest").mkdir(parents=True),
     "'checkpoints/latest' is a folder"),
])
def test_a_run_folder_that_cannot_hold_the_run_is_refused_at_the_start(tmp_path, made, named):
    """A file named checkpoints in the run folder let the run train every step and then
    fail at the first save (internal error, the work lost); a folder named config.yaml or
    checkpoints/latest failed the same way."""
    from peer_dist.train.startup import RunDirLock

    made(tmp_path)
    lock = RunDirLock(tmp_path)
    with pytest.raises(UserError) as e:
        lock.acquire()
    assert str(e.value).startswith(f"train.run_dir={str(tmp_path)!r} cannot hold this run: "
                                   f"{named} (")
    assert lock.fd is None  # released
    RunDirLock(tmp_path / "fresh").acquire()  # a new folder: nothing in the way


def test_a_run_refused_before_training_leaves_no_folder_of_its_own(tmp_path):
    """A run refused after taking its folder's lock (data of other settings, say) left a
    run folder holding only .lock."""
    from peer_dist.train.startup import RunDirLock

    lock = RunDirLock(tmp_path / "new")
    lock.acquire()
    lock.release(tidy=True)
    assert not (tmp_path / "new").exists()
    lock = RunDirLock(tmp_path / "wrote")
    lock.acquire()
    (tmp_path / "wrote" / "metrics.jsonl").write_text("")  # something of the run's: kept
    lock.release(tidy=True)
    assert (tmp_path / "wrote" / "metrics.jsonl").is_file()
    (tmp_path / "mine").mkdir()  # the user's folder: kept as it was given
    lock = RunDirLock(tmp_path / "mine")
    lock.acquire()
    lock.release(tidy=True)
    assert (tmp_path / "mine").is_dir()
