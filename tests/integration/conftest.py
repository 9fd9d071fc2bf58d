"""Session fixtures for the integration tier (helpers live in train_cli_helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_cli_helpers import Runs, env

# DeepSpeed compiles its CPU shared-memory collective on first use (20-26 s, minutes on a busy
# machine) into TORCH_EXTENSIONS_DIR (tests/conftest.py: inside this environment); later loads
# take ~2 s. Built here once, before any timed test, so no test's time includes a build.
BUILD_OPS = """
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)
"""


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built(request) -> None:
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    t0 = time.monotonic()
    if not _built():
        done = subprocess.run([sys.executable, "-c", BUILD_OPS], env=env(), capture_output=True,
                              text=True, timeout=1200)
        if done.returncode != 0:
            pytest.fail(f"DeepSpeed's CPU op does not build:\n{done.stderr[-3000:]}",
                        pytrace=False)
    if report is not None:
        report.write_line(f"DeepSpeed ops ready in {time.monotonic() - t0:.1f} s")


def _built() -> bool:
    """The op's library is in TORCH_EXTENSIONS_DIR already (a build left it there; a changed
    source would still rebuild at its first load)."""
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    return bool(folder) and any(Path(folder).glob("deepspeed_shm_comm/*.so"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("integration"))
