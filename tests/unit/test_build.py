"""The CPU kernels' build: one compile however many ranks start at once, a cache keyed by
compiler and flags, and a clean fallback (one warning, PyTorch kernels) without a compiler.

Each case runs in fresh Python processes with their own cache folder and a $CC that logs every
compile before handing over to the real compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peer_dist.ops import build

REAL_CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(REAL_CC is None, reason="no C compiler")

LOAD = """
import warnings, torch
warnings.simplefilter("always")
from peer_dist.ops import cpu, peer_mix
lib = cpu.library()
x, u = torch.randn(3, 4), torch.randn(5, 4)
y = peer_mix(x, torch.tensor([[0, 4], [1, 1], [2, 3]]), torch.ones(3, 2), u, u)
print("LOADED" if lib is not None else "FALLBACK", tuple(y.shape))
"""


def _logging_cc(tmp_path: Path, real: str | None) -> Path:
    """A $CC that appends one line per compile (not per --version) to compiles.log."""
    cc = tmp_path / "cc"
    body = f'exec "{real}" "$@"' if real else "echo 'error: this compiler is broken' >&2; exit 1"
    log = f'echo x >> "{tmp_path}/compiles.log"'
    cc.write_text(f'#!/bin/sh\ncase "$*" in *--version*) ;; *) {log};; esac\n{body}\n')
    cc.chmod(0o755)
    return cc


def _env(tmp_path: Path, cc: str) -> dict:
    return {**os.environ, "CC": cc, "PEER_DIST_KERNEL_DIR": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1"}


def _compiles(tmp_path: Path) -> int:
    log = tmp_path / "compiles.log"
    return len(log.read_text().split()) if log.exists() else 0


def test_ranks_starting_at_once_compile_once(tmp_path):
    env = _env(tmp_path, str(_logging_cc(tmp_path, REAL_CC)))
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(out.startswith("LOADED (3, 4)") for out, _ in outs), outs
    assert all("unavailable" not in err for _, err in outs), outs
    assert _compiles(tmp_path) == 1  # one builder; the others waited and loaded its library
    libs = list((tmp_path / "cache").glob("peer_kernels_*.so"))
    assert len(libs) == 1 and not list((tmp_path / "cache").glob("tmp*"))  # no leftovers
    again = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True)
    assert again.stdout.startswith("LOADED") and _compiles(tmp_path) == 1  # cached


def test_cache_key_follows_compiler_flags_and_sources(tmp_path, monkeypatch):
    cc, real = ("/usr/bin/cc", "cc 1.0"), build.CSRC
    base = build.build_key(cc, build.FLAGS)
    assert base == build.build_key(cc, build.FLAGS)
    assert base != build.build_key(("/usr/bin/cc", "cc 2.0"), build.FLAGS)
    assert base != build.build_key(cc, (*build.FLAGS, build.NATIVE))
    # a copy of the sources gives the same key; one changed byte in any of them, another key
    for name in build.SOURCES:
        shutil.copy(build.CSRC / name, tmp_path / name)
    monkeypatch.setattr(build, "CSRC", tmp_path)
    assert build.build_key(cc, build.FLAGS) == base
    keys = {base}
    for name in build.SOURCES:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n")
        keys.add(build.build_key(cc, build.FLAGS))
        (tmp_path / name).write_bytes(original)
    assert len(keys) == 1 + len(build.SOURCES)
    assert build.build_key(cc, build.FLAGS) == base
    # every file the kernel includes is part of the key (a header left out would not rebuild)
    included = {line.split('"')[1] for f in build.SOURCES
                for line in (build.CSRC / f).read_text().splitlines()
                if line.startswith("#include \"")}
    assert included <= set(build.SOURCES), included - set(build.SOURCES)
    assert {f.name for f in real.glob("*.[ch]")} == set(build.SOURCES)


@pytest.mark.parametrize("case", ["missing", "broken"])
def test_without_a_working_compiler_one_warning_and_the_pytorch_kernels(tmp_path, case):
    cc = str(tmp_path / "no-such-cc") if case == "missing" else str(_logging_cc(tmp_path, None))
    env = _env(tmp_path, cc)
    env["PATH"] = str(tmp_path)  # no cc or gcc to fall back on either
    done = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("FALLBACK (3, 4)")  # the PyTorch kernels ran the mix
    warnings = [line for line in done.stderr.splitlines() if "kernels unavailable" in line]
    assert len(warnings) == 1, done.stderr
    why = "no C compiler" if case == "missing" else "this compiler is broken"
    assert why in warnings[0]
    assert "Traceback" not in done.stderr
