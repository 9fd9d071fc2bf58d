"""The shared command-line parsing: bounded numbers, and a bad flag as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from oneline import refused

from peer_dist import cli

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.mark.parametrize("kind,text,value", [
    (cli.ints(1, 8), "1", 1), (cli.ints(1, 8), "8", 8), (cli.ints(0), "10000000000", 10 ** 10),
    (cli.floats(0), "0", 0.0), (cli.floats(0, 1), "0.25", 0.25), (cli.floats(0, above=True),
                                                                   "1e-9", 1e-9),
    (cli.int_list(1), "1,2, 4", [1, 2, 4]),
    (cli.ints(1), "1e12", 10 ** 12), (cli.ints(1), "2.0", 2),  # as the config reads integers
])
def test_values_in_bounds_are_read(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize("kind,text,allowed", [
    (cli.ints(1, 8), "0", "an integer from 1 to 8"),
    (cli.ints(1, 8), "9", "an integer from 1 to 8"),
    (cli.ints(1), "1.5", "an integer >= 1"),
    (cli.ints(1), "", "an integer >= 1"),
    (cli.floats(0), "nan", "a number >= 0"),
    (cli.floats(0), "inf", "a number >= 0"),
    (cli.floats(0), "-1e-9", "a number >= 0"),
    (cli.floats(0, above=True), "0", "a number > 0"),
    (cli.floats(0, 1, above=True), "1.5", "a number > 0 and <= 1"),
    (cli.int_list(1), "1,0", "an integer >= 1, comma-separated"),
    (cli.int_list(1), ",", "an integer >= 1, comma-separated"),
    (cli.int_list(1), "64,,64", "an integer >= 1, comma-separated"),  # a typo, not [64, 64]
    (cli.int_list(1), "1,2,", "an integer >= 1, comma-separated"),
])
def test_values_out_of_bounds_name_what_is_allowed(kind, text, allowed):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as e:
        kind(text)
    assert str(e.value) == f"{text!r} is invalid: allowed is {allowed}"


def test_a_bad_flag_is_one_line_with_status_2(capsys):
    p = cli.Parser(prog="peer-x")
    p.add_argument("--threads", type=cli.ints(1, cli.MAX_THREADS), default=2)
    assert p.parse_args(["--threads", "3"]).threads == 3
    for argv, message in [(["--threads", "0"], "argument --threads: '0' is invalid: allowed is "
                           f"an integer from 1 to {cli.MAX_THREADS}"),
                          (["--bogus"], "unrecognized arguments: --bogus")]:
        assert refused(capsys, lambda: p.parse_args(argv)) == (  # noqa: B023
            f"peer-x: {message} (see peer-x --help)")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("plan").add_argument("--n", type=cli.floats(0, above=True))
    line = refused(capsys, lambda: p.parse_args(["plan", "--n", "nan"]))
    assert line.startswith("peer-x plan: argument --n: 'nan'"), line


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--seed", "1e30"),
                                        ("--tokens", "-1"), ("--top-k", "-2"), ("--nproc", "0")])
def test_peer_sample_flags_are_bounded(capsys, flag, value):
    from peer_dist.tools import sample

    line = refused(capsys, lambda: sample.main(["--checkpoint", "m.safetensors", flag, value]))
    assert line.startswith(f"peer-sample: argument {flag}: {value!r} is invalid"), line


@pytest.mark.parametrize("argv,message", [
    (["experts", "--data", "{empty}"], "exists and holds no prepared dataset (no meta.json)"),
    (["experts", "--dim", "12"], "--dim=12: model.n_heads=4 is invalid"),
    (["experts", "--dim", "0"], "argument --dim: '0' is invalid: allowed is an integer from 8 "
     "to 65536"),
    (["experts", "--steps", "0"], "argument --steps: '0' is invalid"),
    (["experts-scaling", "--threads", "-1"], "argument --threads: '-1' is invalid"),
    (["isoflop", "--max-extend", "-1"], "argument --max-extend: '-1' is invalid"),
])
def test_peer_study_refuses_before_training(capsys, tmp_path, argv, message):
    """An existing folder without a dataset was a FileExistsError traceback, a width the heads
    do not divide a ConfigError traceback, and --steps 0 or --threads -1 were accepted."""
    from peer_dist.tools import study

    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    line = refused(capsys, lambda: study.main([*argv, "--out", str(tmp_path / "out")]))
    assert message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--faults", "0"], "argument --faults: '0' is invalid: allowed is an integer from 1 to"),
    (["--nproc", "1"], "argument --nproc: '1' is invalid: allowed is an integer >= 2"),
    (["--nproc", "17"], "--nproc=17: CPU ranks on this machine's 2 core(s)"),
    (["--seed", "-1"], "argument --seed: '-1' is invalid"),
])
def test_peer_chaos_flags_are_bounded(capsys, monkeypatch, argv, message):
    from peer_dist.parallel import topology
    from peer_dist.tools import chaos
    from peer_dist.train import startup

    monkeypatch.setattr(startup, "cpu_cores", lambda: 2)
    monkeypatch.setattr(topology, "pick_backend", lambda: "gloo")
    line = refused(capsys, lambda: chaos.parse_args(argv))
    assert message in line, line


def test_a_ctrl_c_no_tool_handles_is_one_line_and_status_130(capsys, monkeypatch):
    """peer-prepare, peer-study and peer-train during its imports printed a KeyboardInterrupt
    traceback; the console scripts now run each tool's main through cli.run."""
    import sys
    import types

    def interrupted():
        raise KeyboardInterrupt

    fake = types.ModuleType("fake_tool")
    fake.main = interrupted
    monkeypatch.setitem(sys.modules, "fake_tool", fake)
    monkeypatch.setitem(cli.TOOLS, "peer-x", "fake_tool")
    with pytest.raises(SystemExit) as e:
        cli.run("peer-x")
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == ["peer-x: stopped by SIGINT (Ctrl-C)"]
    fake.main = lambda: 3
    with pytest.raises(SystemExit) as e:
        cli.run("peer-x")
    assert e.value.code == 3


def test_every_console_script_runs_through_cli_run():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    section = text.split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^(peer-[a-z]+) = "([^"]+)"$', section, flags=re.M))
    assert set(scripts) == set(cli.TOOLS)
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert module == "peer_dist.cli" and getattr(cli, attr).args == (name,)


def test_a_prompt_that_is_not_utf8_is_one_line(capsys):
    """Bytes the shell passed that are not UTF-8 (Python reads them as lone surrogates) were a
    UnicodeEncodeError traceback."""
    from peer_dist.tools import sample

    assert sample.main(["--checkpoint", "m.safetensors", "--prompt", "ab\udcff\udcfe"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["peer-sample: --prompt holds bytes that are not UTF-8 text (at character 2): "
                   "allowed is UTF-8 text"]


BIG = str(10 ** 30)
NO_PROC = not Path("/proc/self").is_dir()  # /proc/x: a path no folder can be made at


@pytest.mark.parametrize("argv,message", [
    (["isoflop", "--sizes", BIG], "argument --sizes: '1" + "0" * 30 + "' is invalid: allowed is "
     "an integer from 8 to 65536"),
    (["isoflop", "--seeds", BIG], "argument --seeds: '1" + "0" * 30 + "' is invalid: allowed is "
     "an integer from 0 to 9223372036854775807"),
    (["experts", "--seeds", "0," + BIG], "allowed is an integer from 0 to 9223372036854775807"),
    (["experts-scaling", "--seeds", str(2 ** 63)], "from 0 to 9223372036854775807"),
    (["experts", "--num-experts", BIG], "argument --num-experts: '1" + "0" * 30 + "' is invalid: "
     "allowed is an integer from 64 to 1099511627776"),
    (["experts", "--num-experts", str(1 << 40)], "--num-experts=1099511627776 --dim=64 is "
     "invalid here: a model's fp32 weights and Adam's two moments take about"),
    (["experts", "--dim", BIG], "argument --dim: '1" + "0" * 30 + "' is invalid: allowed is an "
     "integer from 8 to 65536"),
    (["experts-scaling", "--dim", "65536"], "--dim=65536 is invalid here"),
    (["isoflop", "--sizes", "16,65536"], "--sizes=65536 is invalid here"),
    (["isoflop", "--budgets", "1e30"], "argument --budgets: '1e30' is invalid: allowed are "
     "numbers > 0 and <= 1e15"),
    (["isoflop", "--budgets", "3e10,inf"], "allowed are numbers > 0 and <= 1e15"),
    (["isoflop", "--budgets", "3e10,,1e11"], "allowed are numbers > 0 and <= 1e15"),
    # every model trained one step and the table still said "budget 1.0e+00"
    (["isoflop", "--budgets", "1,3e10"], "--budgets=1 is invalid: below one training step of "
     "the largest model of --sizes=[16, 24, 32] (4.9e+08 FLOPs)"),
    (["isoflop", "--kinds", "peer,,dense"], "argument --kinds: 'peer,,dense' is invalid: "
     "allowed are any of dense, moe, pkm, peer, moe_ec, comma-separated"),
    (["isoflop", "--data", "{file}/sub"], "--data='{file}/sub' is invalid: '{file}' is a file"),
    (["isoflop", "--out", "{file}"], "--out='{file}' is invalid: '{file}' is a file; allowed is a "
     "folder, new or existing, that can be written"),
    (["experts", "--out", "{file}/sub"], "--out='{file}/sub' is invalid: '{file}' is a file"),
    (["experts-scaling", "--out", ""], "--out='' is invalid: it is empty"),
    pytest.param(["isoflop", "--out", "/proc/x"], "--out='/proc/x' is invalid: a folder cannot "
                 "be made or written in '/proc'",
                 marks=pytest.mark.skipif(NO_PROC, reason="/proc")),
])
def test_peer_study_bounds_every_value_before_any_work(capsys, tmp_path, monkeypatch, argv,
                                                       message):
    """Huge --sizes, --dim, --num-experts or --seeds were tracebacks (an allocator's, torch's
    `Overflow when unpacking long long`), --budgets 1e30 ran for ever, and an --out that is a file
    or cannot be made was found only when the results were written, after the training."""
    from peer_dist.tools import study

    def no_work(*_args, **_kw):
        raise AssertionError("work started")

    monkeypatch.setattr(study, "open_corpus", no_work)
    monkeypatch.setattr(study, "train_eval", no_work)
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    message = message.replace("{file}", str(tmp_path / "file"))
    if "--data" not in argv:
        argv += ["--data", str(tmp_path / "data")]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    line = refused(capsys, lambda: study.main([*argv, *out]))
    assert line.startswith("peer-study") and message in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    assert (tmp_path / "file").is_file()


def test_peer_study_makes_out_before_training_and_takes_the_largest_seed(tmp_path, monkeypatch):
    """--out is made before the first model trains; a seed up to 2**63 - 1 builds every kind
    (PKM's table seed, 1000 x the seed, overflowed torch's generator)."""
    from peer_dist.model.transformer import build_model
    from peer_dist.tools import study

    def started(*_args, **_kw):
        assert (tmp_path / "a" / "out").is_dir()  # made before the work
        raise SystemExit(0)

    monkeypatch.setattr(study, "open_corpus", started)
    with pytest.raises(SystemExit):
        study.main(["isoflop", "--seeds", str(2 ** 63 - 1), "--data", str(tmp_path / "data"),
                    "--out", str(tmp_path / "a" / "out")])
    assert not (tmp_path / "a" / "out").exists()  # stopped before writing: not left empty

    def stopped(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "open_corpus", stopped)
    (tmp_path / "mine").mkdir()  # the user's folder stays, empty or not
    for out in (tmp_path / "new", tmp_path / "mine"):
        with pytest.raises(KeyboardInterrupt):
            study.main(["isoflop", "--data", str(tmp_path / "data"), "--out", str(out)])
    assert not (tmp_path / "new").exists() and (tmp_path / "mine").is_dir()
    for kind in study.KINDS:
        build_model(study.model_config(kind, 8, study.Recipe(), num_experts=64), 2 ** 63 - 1)


@pytest.mark.parametrize("argv,message", [
    (["--run-dir", "{file}"], "is a file; allowed is a folder, new or existing"),
    (["--run-dir", ""], "--run-dir='' is invalid: it is empty"),
    (["--data", "{file}"], "is a file: allowed is a prepared data folder"),
    (["--config", "/nope.yaml"], "config file '/nope.yaml' does not exist"),
    (["model.dim=nan"], "model.dim='nan' is invalid"),
    (["--ckpt-every", "1e30"], "argument --ckpt-every: '1e30' is invalid"),
    # both runs trained 4 steps, then the check looked for step 30: a FileNotFoundError
    (["train.steps=4"], "override 'train.steps=4' is invalid: peer-chaos sets train.steps "
     "itself (from (--faults + 2) x 2 x --ckpt-every): allowed are the other keys"),
    (["train.keep_last=1"], "peer-chaos sets train.keep_last itself"),
    (["train.resume=never"], "peer-chaos sets train.resume itself"),  # every restart at step 0
    (["data.path={data}"], "data.path='{data}' was prepared from other settings than "
     "data.source='stdlib' (it holds ['mine.txt'])"),
])
def test_peer_chaos_checks_its_runs_before_the_reference_trains(capsys, tmp_path, argv, message):
    """Each of these trained the reference run first (or wrote into the working folder) and
    ended in three lines, status 1."""
    from peer_dist.tools import chaos

    (tmp_path / "f").write_text("x")
    data = tmp_path / "data"  # a folder prepared from other text than tiny's data.source
    data.mkdir()
    (data / "meta.json").write_text('{"sources": ["mine.txt"], "tokenizer": "byte"}')
    argv = [a.replace("{file}", str(tmp_path / "f")).replace("{data}", str(data)) for a in argv]
    line = refused(capsys, lambda: chaos.parse_args(
        ["--config", str(TINY), "--run-dir", str(tmp_path / "r"), *argv]))
    assert message.replace("{data}", str(data)) in line, line
    # the same folder named by --data: trained on as it is
    args = chaos.parse_args(["--config", str(TINY), "--run-dir", str(tmp_path / "r"), "--data",
                             str(data)])
    assert chaos.run_overrides(args, tmp_path / "r", 1)[-2:] == [f"data.path={data}",
                                                                 "data.source="]
