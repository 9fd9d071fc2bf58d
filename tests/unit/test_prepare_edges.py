"""peer-prepare at its edges: every input empty, a document above the tokenizer's 4 MiB chunk,
--force over an existing folder, symbolic links, and the checks of --val-fraction and
--max-bytes (each a one-line error naming the value and what is allowed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from peer_dist.data import ByteTokenizer, prepare
from peer_dist.tools.prepare import main as prepare_main

prepare_mod = sys.modules["peer_dist.data.prepare"]  # the module (the package exports the function)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = prepare_main(list(argv))
    return code, capsys.readouterr().err


def _one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("peer-prepare: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


def _docs(out: Path, split: str) -> list[str]:
    """The documents of one split, decoded (each ends with the end-of-document byte)."""
    ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
    assert ids[-1] == ByteTokenizer().eos_id
    return ByteTokenizer().decode(ids[:-1]).split("\x00")


def test_all_inputs_empty_is_one_line(tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("")
    (tmp_path / "in" / "sub" / "b.txt").write_text("")
    (tmp_path / "empty.txt").write_text("")
    code, err = _cli(capsys, str(tmp_path / "in"), str(tmp_path / "empty.txt"),
                     "--out", str(tmp_path / "out"))
    assert code == 2
    _one_error_line(err, "no input text found (all inputs empty)")
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_a_document_above_the_encode_chunk_keeps_its_place(tmp_path):
    """A 5 MiB document between two small ones: the tokenizer gets it in a batch of its own
    (the pending text passes ENCODE_CHUNK_BYTES), and the stream keeps the document order."""
    big = ("0123456789abcdef" * 65536) * 5  # 5 MiB of ASCII
    assert len(big) > prepare_mod.ENCODE_CHUNK_BYTES
    src = tmp_path / "in"
    src.mkdir()
    texts = {"a.txt": "first small document\n", "b.txt": big, "c.txt": "last small one\n"}
    for name, text in texts.items():
        (src / name).write_text(text)
    batches = []
    real = ByteTokenizer.encode_batch
    ByteTokenizer.encode_batch = lambda self, t: batches.append(len(t)) or real(self, t)
    try:
        meta = prepare([str(src)], tmp_path / "out", val_fraction=0.01, max_bytes=10 << 20,
                       log=lambda _: None)
    finally:
        ByteTokenizer.encode_batch = real
    assert len(batches) >= 2  # flushed at the chunk, then the rest at the end
    out = {split: _docs(tmp_path / "out", split) for split in ("train", "val")}
    # the documents in stream order (meta's files), each split's in its own order, give back
    # every input byte in file order; the big one may be cut (train head, validation tail)
    stream = [out[split].pop(0) for _, split, _ in meta["files"]]
    assert out == {"train": [], "val": []}
    assert "".join(stream) == "".join(texts.values())
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == sum(map(len, texts.values()))


def test_force_replaces_an_existing_folder_and_without_it_nothing_moves(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text to hold out a little of\n" * 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    (out / "meta.json").write_text("{}")  # an earlier dataset: --force may replace it
    code, err = _cli(capsys, str(tmp_path / "a.txt"), "--out", str(out))
    assert code == 2
    _one_error_line(err, f"output folder '{out}' exists", "--force")
    assert (out / "stale.bin").read_bytes() == b"old"  # untouched
    code, _ = _cli(capsys, str(tmp_path / "a.txt"), "--out", str(out), "--force")
    assert code == 0
    assert not (out / "stale.bin").exists()  # the old folder is gone, not merged
    assert json.loads((out / "meta.json").read_text())["sources"] == [str(tmp_path / "a.txt")]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_never_deletes_the_inputs_a_file_or_another_folder(tmp_path, capsys):
    """--force once replaced whatever --out named: the input folder itself, a file, a folder of
    other files. It replaces only a dataset written here, or an empty folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text to hold out a little of\n" * 50)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    for out, words in [(src, ["holds the input", "--force would delete it"]),
                       (other, ["is not a dataset written by peer-prepare", "empty one"]),
                       (tmp_path / "notes.txt", ["is not a dataset written by peer-prepare"])]:
        code, err = _cli(capsys, str(src), "--out", str(out), "--force")
        assert code == 2
        _one_error_line(err, f"--out '{out}'", *words)
    assert (src / "a.txt").is_file() and (other / "keep.txt").read_text() == "mine"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert _cli(capsys, str(src), "--out", str(tmp_path / "empty"), "--force")[0] == 0
    assert (tmp_path / "empty" / "meta.json").is_file()


def test_symlinks_inside_folders_are_skipped_but_a_linked_input_is_read(tmp_path):
    """A link inside a walked folder may point anywhere (a loop, outside the corpus): skipped,
    file or folder. A link given as an input is what the user named: read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("OUTSIDE TEXT\n" * 20)
    src = tmp_path / "in"
    src.mkdir()
    (src / "own.txt").write_text("own text of the corpus\n" * 20)
    (src / "link.txt").symlink_to(outside / "secret.txt")
    (src / "linkdir").symlink_to(outside, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)
    meta = prepare([str(src)], tmp_path / "out", log=lambda _: None)
    names = [f[0] for f in meta["files"]]
    assert set(names) == {f"{src.as_posix()}/own.txt"}, names
    text = "".join(_docs(tmp_path / "out", "train") + _docs(tmp_path / "out", "val"))
    assert "OUTSIDE" not in text
    meta = prepare([str(src / "link.txt"), str(src / "own.txt")], tmp_path / "out2",
                   log=lambda _: None)
    assert [f[0] for f in meta["files"] if f[2] != "tail"][0] == f"{src.as_posix()}/link.txt"


@pytest.mark.parametrize("flag, value, words", [
    ("--val-fraction", "0", ["val_fraction=0.0 is invalid", "a fraction in (0, 1)"]),
    ("--val-fraction", "1", ["val_fraction=1.0 is invalid", "a fraction in (0, 1)"]),
    ("--val-fraction", "-0.1", ["val_fraction=-0.1 is invalid"]),
    ("--max-bytes", "0", ["max_bytes=0 is invalid", "allowed is > 0"]),
    ("--max-bytes", "-5", ["max_bytes=-5 is invalid", "allowed is > 0"]),
])
def test_bad_fraction_or_cap_is_one_line_before_any_work(tmp_path, capsys, flag, value, words):
    (tmp_path / "a.txt").write_text("text\n" * 100)
    code, err = _cli(capsys, str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"),
                     f"{flag}={value}")
    assert code == 2
    _one_error_line(err, *words)
    assert not (tmp_path / "out").exists()


def test_max_bytes_caps_the_corpus_and_val_fraction_its_held_out_share(tmp_path):
    """5 files of 10,000 bytes, max_bytes 25,000: the first 2.5 files in sorted order; 20%
    held out by bytes (whole documents, then one cut) whatever the file count."""
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text(chr(ord("a") + i) * 9999 + "\n")
    meta = prepare([str(tmp_path)], tmp_path / "out", val_fraction=0.2, max_bytes=25_000,
                   log=lambda _: None)
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == 25_000
    assert abs(meta["bytes"]["val"] - 5_000) <= 4  # a cut rounds to a character
    text = "".join(_docs(tmp_path / "out", "train") + _docs(tmp_path / "out", "val"))
    assert set(text) == {"a", "b", "c", "\n"} and text.count("c") == 5_000


def _no_writing(monkeypatch) -> None:
    """Fail the test when the shards would be written: a bad input is refused before."""
    def no_work(*_args, **_kw):
        raise AssertionError("writing started")

    monkeypatch.setattr(prepare_mod, "_write", no_work)


def test_an_empty_input_is_one_line_not_the_current_folder(tmp_path, capsys, monkeypatch):
    """"" was read as the current folder: everything under it prepared."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("text in the current folder\n" * 100)
    _no_writing(monkeypatch)
    code, err = _cli(capsys, "", "--out", str(tmp_path / "out"))
    assert code == 2
    _one_error_line(err, "input '' is empty: allowed are files, folders or 'stdlib'")
    assert not (tmp_path / "out").exists()


def test_a_file_named_twice_is_read_once(tmp_path):
    """The same file given twice, or a file and the folder holding it, was read twice."""
    src = tmp_path / "txt"
    src.mkdir()
    (src / "a.txt").write_text("a" * 999 + "\n")
    (src / "b.txt").write_text("b" * 499 + "\n")
    notes: list[str] = []
    meta = prepare([str(src / "a.txt"), str(src / "a.txt"), str(src), f"{src}/../txt/b.txt"],
                   tmp_path / "out", val_fraction=0.1, log=notes.append)
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == 1500
    assert sorted({f[0] for f in meta["files"]}) == [f"{src.as_posix()}/a.txt",
                                                      f"{src.as_posix()}/b.txt"]
    assert [n for n in notes if "more than once" in n] == [
        "peer-prepare: 3 files named more than once are read once"]


def test_an_earlier_output_inside_the_input_is_not_read(tmp_path):
    """`peer-prepare fdir --out fdir/out --force` a second time read the first output's
    meta.json as a training document."""
    src = tmp_path / "fdir"
    src.mkdir()
    (src / "a.txt").write_text("a" * 999 + "\n")
    first = prepare([str(src)], src / "out", val_fraction=0.1, log=lambda m: None)
    notes: list[str] = []
    again = prepare([str(src)], src / "out", val_fraction=0.1, force=True, log=notes.append)
    assert again["bytes"] == first["bytes"] and again["files"] == first["files"]
    assert [n for n in notes if "--out" in n] == [
        f"peer-prepare: 3 files under --out {str(src / 'out')!r} (an earlier output) are not "
        "read"]


@pytest.mark.parametrize("argv, words", [
    (["--max-bytes", "1", "{txt}"],
     ["max_bytes=1 and inputs of 1,500 bytes give 1 bytes of text", "allowed is at least 100 "
      "bytes (1 / val_fraction): a larger max_bytes or a larger val_fraction"]),
    (["{txt}/b.txt", "--val-fraction", "0.001"],
     ["inputs of 500 bytes", "allowed is at least 1,000 bytes", "more text"]),
])
def test_too_little_text_for_validation_says_what_is_allowed(tmp_path, capsys, monkeypatch,
                                                             argv, words):
    """--max-bytes 1 failed after writing, with a split error that said nothing allowed."""
    src = tmp_path / "txt"
    src.mkdir()
    (src / "a.txt").write_text("a" * 999 + "\n")
    (src / "b.txt").write_text("b" * 499 + "\n")
    _no_writing(monkeypatch)
    code, err = _cli(capsys, *[a.replace("{txt}", str(src)) for a in argv],
                     "--out", str(tmp_path / "out"))
    assert code == 2
    _one_error_line(err, *words)


@pytest.mark.parametrize("out, words", [
    ("{file}/sub", ["--out='{file}/sub' is invalid: '{file}' is a file", "allowed is a new "
                    "folder whose parent can be made and written"]),
    ("", ["--out='' is invalid: it is empty"]),
    pytest.param("/proc/x", ["--out='/proc/x' is invalid: a folder cannot be made or written "
                             "in '/proc'"],
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="/proc")),
])
def test_an_out_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys, monkeypatch, out,
                                                          words):
    """--out under a file was `[Errno 17] File exists: 'gf2'`, --out /proc/x `[Errno 2] ...`."""
    (tmp_path / "a.txt").write_text("text\n" * 100)
    (tmp_path / "file").write_text("mine")
    _no_writing(monkeypatch)
    code, err = _cli(capsys, str(tmp_path / "a.txt"),
                     "--out", out.replace("{file}", str(tmp_path / "file")))
    assert code == 2
    _one_error_line(err, *[w.replace("{file}", str(tmp_path / "file")) for w in words])
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("out, words", [
    ("{file}/m.safetensors", ["--out='{file}/m.safetensors' is invalid: '{file}' is a file",
                              "allowed is a .safetensors file in a folder that can be made"]),
    ("{dir}.safetensors", ["--out='{dir}.safetensors' is invalid: '{dir}.safetensors' is a "
                           "folder"]),
    pytest.param("/proc/x/m.safetensors", ["--out='/proc/x/m.safetensors' is invalid: a folder "
                                           "cannot be made or written in '/proc'"],
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="/proc")),
])
def test_peer_export_out_that_cannot_be_written_is_one_line_before_loading(tmp_path, capsys,
                                                                          monkeypatch, out,
                                                                          words):
    """peer-export --out under a file was `[Errno 17] File exists`, found after the checkpoint
    was loaded."""
    from peer_dist.tools import export

    def no_work(*_args, **_kw):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(export, "export", no_work)
    fill = {"{file}": str(tmp_path / "file"), "{dir}": str(tmp_path / "dir")}
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dir.safetensors").mkdir()
    for key, value in fill.items():
        out = out.replace(key, value)
        words = [w.replace(key, value) for w in words]
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", out]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peer-export: "), err
    assert all(w in lines[0] for w in words), lines[0]


def test_a_device_or_a_pipe_as_input_is_named_as_such(tmp_path, capsys):
    """/dev/null or a FIFO was 'does not exist'."""
    import os

    pipe = tmp_path / "fifo"
    os.mkfifo(pipe)
    for item in ("/dev/null", str(pipe)):
        code, err = _cli(capsys, item, "--out", str(tmp_path / "out"))
        assert code == 2
        _one_error_line(err, f"input {item!r} is not a file or a folder (a device or a pipe)")
    assert not (tmp_path / "out").exists()
