"""Config tree: unknown keys, wrong types and bad values fail early, naming key and allowed."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from peer_dist.config import Config, ConfigError, PEERConfig, load_config, read_yaml, save_config


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_paper_like():
    cfg = load_config()
    p = cfg.model.peer
    assert (p.heads, p.topk, p.activation, p.query_batchnorm) == (8, 16, "gelu", True)


def test_yaml_and_dotted_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  dim: 64\n  peer:\n    num_experts: 1024\n    topk: 8\n")
    cfg = load_config(path, ["model.peer.heads=2", "optim.betas=[0.8, 0.9]",
                             "model.peer.query_batchnorm=false", "optim.lr=0.01"])
    assert cfg.model.dim == 64
    assert (cfg.model.peer.num_experts, cfg.model.peer.topk, cfg.model.peer.heads) == (1024, 8, 2)
    assert cfg.model.peer.query_batchnorm is False
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 0.01
    assert isinstance(cfg.optim.lr, float)


def test_override_beats_file(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 5\n")
    assert load_config(path, ["train.steps=7"]).train.steps == 7
    # in order: a key given twice takes its last value (README)
    assert load_config(path, ["train.steps=2", "train.steps=3"]).train.steps == 3


@pytest.mark.parametrize("override,key,allowed", [
    ("model.peer.num_experts=1000", "model.peer.num_experts", "perfect square"),
    ("model.peer.num_experts=0", "model.peer.num_experts", "perfect square"),
    ("model.peer.topk=257", "model.peer.topk", "sqrt(num_experts) = 256"),
    ("model.peer.topk=0", "model.peer.topk", "1 <= topk"),
    ("model.peer.d_key=7", "model.peer.d_key", "even"),
    ("model.peer.heads=0", "model.peer.heads", ">= 1"),
    ("model.peer.activation=swish", "model.peer.activation", "['gelu', 'relu']"),
    ("parallel.strategy=scatter", "parallel.strategy",
     "['auto', 'fetch', 'dispatch', 'node_dispatch']"),
    ("parallel.bn_sync=maybe", "parallel.bn_sync", "['global', 'local']"),
    # each chunk makes all-to-alls of its own: 100,000 of them took a step to minutes
    ("parallel.overlap_chunks=65", "parallel.overlap_chunks", "from 1 (no overlap) to 64"),
    ("parallel.overlap_chunks=0", "parallel.overlap_chunks", "from 1 (no overlap) to 64"),
    ("optim.table_optimizer=rmsprop", "optim.table_optimizer", "lazy_adam"),
    # accepted, and had no effect
    (["optim.table_optimizer=adagrad", "optim.table_bias_correction=row"],
     "optim.table_bias_correction", "'global' with optim.table_optimizer='adagrad'"),
    ("optim.betas=[0.9, 1.5]", "optim.betas", "[0, 1)"),
    ("train.zero_stage=4", "train.zero_stage", "[0, 1, 2, 3]"),
    ("train.dtype=fp16", "train.dtype", "'bf16'"),
    ("model.peer_blocks=7", "model.peer_blocks", "block indices"),
    ("model.peer_blocks=0,,1", "model.peer_blocks", "block indices"),  # an empty item: a typo
    ("data.tokenizer=", "data.tokenizer", "byte or the path"),
    # accepted before, and then every step was skipped as non-finite
    ("model.rope_theta=0", "model.rope_theta", "a number > 1"),
    ("model.norm_eps=-1", "model.norm_eps", "(0, 1)"),
    ("optim.eps=0", "optim.eps", "(0, 1)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay", ">= 0"),
    ("train.seed=-1", "train.seed", "0 to 2**63 - 1"),  # blamed the data
    ("train.seed=1e30", "train.seed", "below 2**63"),  # an overflow traceback
    ("train.run_dir=", "train.run_dir", "not empty"),  # wrote into the working folder
    ("train.steps=1e30", "train.steps", "below 2**63"),  # trained without end
    ("train.collective_timeout_s=1e30", "train.collective_timeout_s", "from 1 to"),  # overflow
    ("train.stop_grace_s=0", "train.stop_grace_s", "from 1 to"),
    ("train.threads=100000", "train.threads", "from 1 to 1024"),
    ("train.collective_timeout_s=1e-9", "train.collective_timeout_s", "from 1 to"),  # C++ dump
])
def test_invalid_values_name_key_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override] if isinstance(override, str) else override)
    msg = str(err.value)
    assert key in msg and allowed in msg, msg


def test_overlap_chunks_at_most_a_micro_batch_of_tokens():
    cfg = load_config(None, ["parallel.overlap_chunks=6", "train.batch_size=2",
                             "train.seq_len=3"])
    assert cfg.parallel.overlap_chunks == 6
    with pytest.raises(ConfigError, match=r"parallel.overlap_chunks=7 is invalid: allowed is at "
                       r"most .* train.batch_size x train.seq_len = 6"):
        load_config(None, ["parallel.overlap_chunks=7", "train.batch_size=2", "train.seq_len=3"])


@pytest.mark.parametrize("override,allowed", [
    ("model.peer.heads=two", "int"),
    ("model.peer.heads=2.5", "int"),
    ("model.peer.query_batchnorm=1", "bool"),
    ("optim.lr=fast", "finite number"),
    ("optim.lr=nan", "finite number"),
    ("optim.lr=.inf", "finite number"),
    ("train.steps=1.5", "integer"),
    ("optim.betas=0.9", "list of 2"),
    ("train.steps=true", "int"),
])
def test_wrong_types(override, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("override", ["model.peer.num_expert=4", "modle.dim=4", "dim=4",
                                      "model.peer.heads.x=1"])
def test_unknown_override_keys(override):
    with pytest.raises(ConfigError, match="unknown config key|not a section|must be a mapping"):
        load_config(None, [override])


def test_unknown_file_key_lists_allowed(tmp_path):
    path = _write(tmp_path, "model:\n  peer:\n    experts: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.peer.experts" in str(err.value) and "num_experts" in str(err.value)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["model.dim"])
    with pytest.raises(ConfigError, match="seq_len"):
        load_config(None, ["train.seq_len=512", "model.max_seq_len=256"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["model.peer.num_experts=4096", "model.peer.shared_keys=true",
                             "optim.betas=[0.85, 0.99]", "parallel.strategy=dispatch"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    back = load_config(path)
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert isinstance(back, Config) and back.optim.betas == (0.85, 0.99)


def test_peer_config_validate_directly():
    PEERConfig(num_experts=16, topk=4, d_key=2).validate()
    with pytest.raises(ConfigError, match="x.topk"):
        PEERConfig(num_experts=16, topk=5).validate(prefix="x")


@pytest.mark.parametrize("text,value", [
    ("3e-4", 3e-4), ("3E-4", 3e-4), ("3.0e-4", 3e-4), ("0.0003", 3e-4), ("+3e-4", 3e-4),
    ("1e-3", 1e-3), ("2", 2.0), ("1_0.5", 10.5),
])
def test_floats_in_any_notation(tmp_path, text, value):
    """YAML 1.1 reads 3e-4 (no dot) as a string: overrides and files accept it as a number."""
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == pytest.approx(value)
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {text}\n")
    assert load_config(path).optim.lr == pytest.approx(value)


@pytest.mark.parametrize("text,value", [("1e3", 1000), ("1_000", 1000), ("20.0", 20)])
def test_integers_in_float_notation(text, value):
    assert load_config(None, [f"train.steps={text}"]).train.steps == value


@pytest.mark.parametrize("body,line,column", [
    ("train:\n  steps: 3\n bad: [\n", 3, 2),
    ("train: {steps: 3\n", 2, 1),
    ("optim:\n\tlr: 1\n", 2, 1),
])
def test_malformed_yaml_names_file_line_and_column(tmp_path, body, line, column):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "bad.yaml" in msg and f"line {line}, column {column}" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("body,key,line", [
    ("train:\n  steps: 5\n  steps: 7\n", "steps", 3),  # PyYAML kept the last: 7
    ("train: {steps: 5}\nmodel: {dim: 64}\ntrain: {lr: 1.0}\n", "train", 3),  # lost steps
])
def test_a_key_written_twice_is_refused(tmp_path, body, key, line):
    path = tmp_path / "twice.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=f"twice.yaml' is not valid YAML at line {line}, "
                                          f"column [0-9]+: key '{key}' appears twice"):
        load_config(path)
    assert yaml.safe_load(body)  # PyYAML alone takes it
    path.write_text("a: &b {steps: 5, lr: 0.5}\nc:\n  <<: *b\n  steps: 7\n")
    assert read_yaml(path)["c"] == {"steps": 7, "lr": 0.5}  # a merge key's later keys override


def test_new_train_fields_are_validated():
    cfg = load_config(None, ["train.nonfinite=stop", "train.max_skipped=3",
                             "train.collective_timeout_s=2.5"])
    assert (cfg.train.nonfinite, cfg.train.max_skipped, cfg.train.collective_timeout_s) == (
        "stop", 3, 2.5)
    for bad, allowed in [("train.nonfinite=retry", "['skip', 'stop']"),
                         ("train.max_skipped=0", ">= 1"),
                         ("train.collective_timeout_s=0.5", "from 1 to 1,000,000")]:
        with pytest.raises(ConfigError, match=re.escape(allowed)):
            load_config(None, [bad])
