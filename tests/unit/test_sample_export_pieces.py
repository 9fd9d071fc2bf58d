"""peer-export's file format and table gathering, and peer-sample's token choice (no training:
the end-to-end checks against a trained checkpoint are in tests/integration)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from peer_dist.config import load_config, save_config
from peer_dist.model.transformer import build_model
from peer_dist.parallel.idmap import IdMap
from peer_dist.tools.export import build_loaded, load_safetensors, model_state, save_safetensors
from peer_dist.tools.sample import generate, next_token

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_safetensors_round_trip_keeps_dtypes_shapes_and_values(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "count": torch.tensor(12, dtype=torch.int64), "none": torch.zeros(0, 4),
               "t": torch.randn(4, 6, generator=g).t()}  # not contiguous
    save_safetensors(tmp_path / "m.safetensors", tensors, {"format": "x", "step": "3"})
    back, meta = load_safetensors(tmp_path / "m.safetensors")
    assert meta == {"format": "x", "step": "3"}
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k], t), k
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["b"]["dtype"] == "BF16" and header["count"]["shape"] == []
    assert header["a"]["data_offsets"] == [0, 60]  # 15 float32 values first


def _damaged(raw: bytes, how: str) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    if how == "truncated":
        return raw[:len(raw) - 9]
    if how == "short":
        return raw[:5]
    if how == "length":
        return struct.pack("<Q", 1 << 40) + raw[8:]
    if how == "not utf-8":
        return raw[:8] + b"\xff" * 4 + raw[12:]
    if how == "not json":
        return raw[:8] + b"[" + raw[9:]
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [3, 6] if how == "shape" else header["a"]["shape"]
    header["a"]["dtype"] = "Q9" if how == "dtype" else header["a"]["dtype"]
    head = json.dumps(header).encode().ljust(n)
    return raw[:8] + head[:n] + raw[8 + n:]


@pytest.mark.parametrize("how", ["truncated", "short", "length", "not utf-8", "not json",
                                 "shape", "dtype"])
def test_a_damaged_safetensors_file_is_named_not_a_traceback(tmp_path: Path, how: str):
    """struct.error, UnicodeDecodeError, JSONDecodeError or a reshape error reached the user of
    peer-sample before; now one UserError names the file and what is wrong."""
    from peer_dist.errors import UserError

    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": torch.ones(3, 5), "b": torch.ones(7)}, {"format": "x"})
    path.write_bytes(_damaged(path.read_bytes(), how))
    with pytest.raises(UserError, match="m.safetensors' is not a whole safetensors file") as e:
        load_safetensors(path)
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path: Path):
    cfg = load_config(TINY)
    state = build_model(cfg.model, seed=0).state_dict()
    small = load_config(TINY, ["model.dim=32", "model.n_heads=2"])
    from peer_dist.errors import UserError

    with pytest.raises(UserError, match=r"size mismatch for .* \(and \d+ more\); allowed") as e:
        build_loaded(small, state)
    assert "\n" not in str(e.value)


def test_the_rotary_tables_an_earlier_zero3_checkpoint_saved_are_left_out():
    """ZeRO-3 checkpoints saved every buffer, the rotary tables (non-persistent) too: peer-sample
    and peer-export refused them (`Unexpected key(s) in state_dict: "rope_cos", "rope_sin"`)."""
    from peer_dist.train.checkpoint import unsaved_buffers

    cfg = load_config(TINY)
    model = build_model(cfg.model, seed=0)
    unsaved = unsaved_buffers(model)
    assert unsaved == {"rope_cos", "rope_sin"}
    state = {**model.state_dict(), **{k: v for k, v in model.named_buffers() if k in unsaved}}
    loaded = build_loaded(cfg, state)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def _fake_checkpoint(tmp_path: Path, balance: bool):
    """A checkpoint folder as training writes it (dense_full.pt, tables/ by DCP in table-position
    order, config.yaml) for the tiny model; returns (cfg, the model it holds)."""
    import torch.distributed.checkpoint as dcp

    cfg = load_config(TINY, [f"parallel.balance_ids={str(balance).lower()}"])
    model = build_model(cfg.model, seed=5)  # whole tables, expert-id order
    state = model.state_dict()
    tables = {k: state.pop(k) for k in list(state) if k.endswith(("experts.u", "experts.v"))}
    torch.save(state, tmp_path / "dense_full.pt")
    n = cfg.model.peer.num_experts
    experts = IdMap(n, 1, balance).expert(torch.arange(n))  # the expert at each position
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({k: t[experts].contiguous() for k, t in tables.items()},
                 checkpoint_id=str(tmp_path / "tables"), no_dist=True)
    save_config(cfg, tmp_path / "config.yaml")
    return cfg, model


@pytest.mark.parametrize("balance", [False, True])
def test_gathered_tables_are_in_expert_order(tmp_path: Path, balance: bool):
    cfg, model = _fake_checkpoint(tmp_path, balance)
    if balance:
        assert not IdMap(cfg.model.peer.num_experts, 1, True).identity  # a real permutation
    loaded = build_loaded(cfg, model_state(tmp_path, cfg))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_next_token_greedy_top_k_and_seed():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0, 0.5])
    assert next_token(logits, 0.0, 0, None) == 1
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 5.0, 1, g) for _ in range(20)} == {1}  # top-1 is greedy
    draws = {next_token(logits, 100.0, 2, g) for _ in range(200)}
    assert draws == {1, 2}  # flat at high temperature, but only the 2 likeliest
    a = [next_token(logits, 1.0, 0, torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [next_token(logits, 1.0, 0, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b


def test_a_tiny_temperature_is_nearly_greedy_and_ids_stay_in_the_tokenizer():
    """--temperature 1e-40 was a traceback (logits / T overflowed: probabilities inf/inf), and
    a model.vocab_size above the tokenizer's drew ids the byte tokenizer cannot decode."""
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0, 0.5, 9.0])
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 1e-40, 0, g) for _ in range(10)} == {5}
    for tiny in (1e-300, 5e-324):  # below float32: 0/0 was NaN (a traceback)
        assert {next_token(logits, tiny, 0, g) for _ in range(10)} == {5}
    assert {next_token(logits, 1e-40, 3, g) for _ in range(10)} == {5}
    assert {next_token(logits, 1e-40, 0, g, vocab=5) for _ in range(10)} == {1}  # 5: no text
    assert next_token(logits, 0.0, 0, None, vocab=5) == 1
    assert {next_token(logits, 50.0, 0, g, vocab=3) for _ in range(100)} == {0, 1, 2}


def test_the_tokenizer_of_a_model_is_its_data_or_one_line(tmp_path: Path, monkeypatch):
    """A run trained with a relative data.path, sampled from another folder, fell back to the
    byte tokenizer whatever the data's was (prompt encoded wrongly, then a ValueError)."""
    from peer_dist.data import prepare
    from peer_dist.errors import UserError
    from peer_dist.tools.sample import load_tokenizer_of

    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", val_fraction=0.1, log=lambda m: None)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, ["data.path=d", "model.vocab_size=300"])
    assert load_tokenizer_of(cfg).vocab_size == 256  # found: byte, 256 ids of the model's 300
    monkeypatch.chdir(tmp_path / "d")  # data.path=d is not found from here
    with pytest.raises(UserError, match=r"the model's tokenizer is not known here: "
                                        r"data.path='d'.*--tokenizer FILE"):
        load_tokenizer_of(cfg)
    assert load_tokenizer_of(cfg, "byte").vocab_size == 256  # named: taken
    small = load_config(TINY, ["data.path=d", "model.vocab_size=200"])
    with pytest.raises(UserError, match="the tokenizer 'byte' has 256 ids, the model 200"):
        load_tokenizer_of(small, "byte")
    with pytest.raises(UserError, match="--tokenizer: tokenizer file '/nope.json' does not"):
        load_tokenizer_of(cfg, "/nope.json")


def test_generate_continues_greedily_and_stops_at_eos():
    class Fixed(torch.nn.Module):  # next token = (last + 1) % 5, as logits
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot((x + 1) % 5, 5).float() * 10

    assert generate(Fixed(), [1], 6, max_len=4) == [1, 2, 3, 4, 0, 1, 2]
    assert generate(Fixed(), [1], 6, max_len=4, eos_id=4) == [1, 2, 3, 4]


def test_export_leaves_a_yaml_it_did_not_write_alone(tmp_path: Path, capsys):
    """--out ex/my.safetensors replaced the user's own ex/my.yaml without a word; with
    ex/d.yaml a folder the weights were written and the config then failed (weights without
    their config). Both are refused before the checkpoint is read."""
    from peer_dist.tools import export

    (tmp_path / "my.yaml").write_text("mine: 1\n")
    (tmp_path / "d.yaml").mkdir()
    for name, why in (("my", "would replace a file that no earlier export wrote"),
                      ("d", "would replace a folder")):
        assert export.main(["--checkpoint", str(tmp_path / "none"), "--out",
                            str(tmp_path / f"{name}.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert (tmp_path / "my.yaml").read_text() == "mine: 1\n"
    assert not list(tmp_path.glob("*.safetensors"))
    (tmp_path / "my.safetensors").write_bytes(b"")  # an earlier export's pair: replaced
    assert export.main(["--checkpoint", str(tmp_path / "none"), "--out",
                        str(tmp_path / "my.safetensors")]) == 2
    assert "would replace" not in capsys.readouterr().err  # refused for the checkpoint only


def test_sharded_sampling_names_a_bad_checkpoint_once_before_the_ranks(tmp_path, capsys,
                                                                        monkeypatch):
    """peer-sample --nproc 2 with a folder holding no checkpoint printed the line once per
    rank, after starting them."""
    from peer_dist.tools import sample
    from peer_dist.train import __main__ as train_main

    monkeypatch.setattr(train_main, "launch", lambda *a, **k: pytest.fail("ranks started"))
    monkeypatch.delenv("RANK", raising=False)
    assert sample.main(["--checkpoint", str(tmp_path), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"peer-sample: --checkpoint={str(tmp_path)!r} holds no checkpoint; allowed: "
                   "a run directory, its checkpoints/ folder, or one step_* directory in it"]


def test_launcher_variables_left_in_the_shell_are_one_line():
    """RANK alone made peer-sample a rank of a job that does not exist (a traceback)."""
    from peer_dist.tools.sample import launch_env_error

    assert "RANK='0' without WORLD_SIZE" in launch_env_error({"RANK": "0"})
    assert "RANK='abc' is invalid" in launch_env_error({"RANK": "abc", "WORLD_SIZE": "2"})
    assert "RANK=2 with WORLD_SIZE=2" in launch_env_error({"RANK": "2", "WORLD_SIZE": "2"})
    assert launch_env_error({}) is None
    assert launch_env_error({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}) is None


def test_the_end_of_document_token_is_not_printed():
    from peer_dist.data.tokenizers import load_tokenizer
    from peer_dist.tools.sample import new_text

    tok = load_tokenizer("byte")
    assert tok.eos_id is not None
    ids = [int(i) for i in tok.encode("hi")]
    assert new_text(tok, [*ids, tok.eos_id]) == "hi"  # was "hi\x00"
    assert new_text(tok, ids) == "hi"
