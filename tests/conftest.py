"""Every test carries its tier as a marker (from its folder), so a tier runs alone:

    pytest -m unit                    # one process, seconds
    pytest -m "unit or distributed"   # the fast tiers, no torchrun
    pytest -m integration             # torchrun and the real CLI, minutes

Without a GPU, the Triton kernels' tests run under Triton's interpreter (TRITON_INTERPRET=1).

Under CI=true a test skipped for want of something the project needs (a C compiler, triton,
hadolint, tokenizers) fails instead: a CI machine without them would otherwise stay green with
the default CPU path untested.

PEER_COVERAGE=<data file> measures the unit tier's coverage of peer_dist (collection and the
unit tests; paused while the other tiers run, whose work is in other processes anyway);
launch/test.sh sets it and prints the report.

DeepSpeed's compiled ops (its shared-memory collective on CPU) are cached in the Python
environment itself (TORCH_EXTENSIONS_DIR, unless set): one build per environment, which no
change of XDG_CACHE_HOME and no other environment's torch version invalidates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be
# chosen before the kernels are defined (at the first import of peer_dist.ops).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import _fast_interpreter  # noqa: E402,F401 (under the interpreter: patched once per launch)

TIERS = ("unit", "distributed", "integration")
# skip reasons that name a requirement of the project (failures under CI=true)
REQUIRED_IN_CI = ("no C compiler", "fused CPU kernels", "triton not installed",
                  "hadolint is not installed", "could not import 'tokenizers'")


def _extensions_dir() -> None:
    """TORCH_EXTENSIONS_DIR inside this environment, where it is writable (inherited by every
    rank and CLI launch the tests start)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    folder = Path(sys.prefix) / "torch_extensions"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return  # a read-only environment: torch's default folder
    if os.access(folder, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)


_extensions_dir()


COVERAGE = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    data_file = os.environ.get("PEER_COVERAGE")
    # under pytest-xdist (-n) the workers run the tests, each into a file of its own
    # (data_file.<worker>: `coverage combine` joins them); the controller runs none
    worker = getattr(config, "workerinput", {}).get("workerid")
    controller = worker is None and (getattr(config.option, "numprocesses", None) or 0) != 0
    if data_file and not controller:
        import coverage  # the [test] extra; only asked for by PEER_COVERAGE

        cov = coverage.Coverage(data_file=f"{data_file}.{worker}" if worker else data_file,
                                source=["peer_dist"], omit=[KERNEL_BODIES])
        cov.start()
        config.stash[COVERAGE] = cov
        _untraced_kernel_launches(cov)


# The Triton kernels' bodies: GPU code, which the interpreter runs as Python, line by line in
# numpy. Traced, the interpreter's test files took 2.4x as long (31 s against 13 s): kernel
# launches run untraced, and the file is left out of the report (the kernels' tests compare
# them with the oracle; their launch wrappers in triton_mix.py stay measured).
KERNEL_BODIES = "*/peer_dist/ops/triton_kernels.py"


def _untraced_kernel_launches(cov) -> None:
    try:
        import triton.runtime.interpreter as ti

        launch = ti.GridExecutor.__call__
    except (ImportError, AttributeError):
        return

    def call(self, *args, **kwargs):
        if sys.gettrace() is None:  # coverage paused (another tier's test)
            return launch(self, *args, **kwargs)
        cov.stop()
        try:
            return launch(self, *args, **kwargs)
        finally:
            cov.start()

    ti.GridExecutor.__call__ = call


def pytest_unconfigure(config: pytest.Config) -> None:
    cov = config.stash.get(COVERAGE, None)
    if cov is not None:
        cov.stop()
        cov.save()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    cov = item.config.stash.get(COVERAGE, None)
    pause = cov is not None and item.get_closest_marker("unit") is None
    if pause:
        cov.stop()
    yield
    if pause:
        cov.start()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(word in reason for word in REQUIRED_IN_CI):
        report.outcome = "failed"
        report.longrepr = f"required in CI (CI={os.environ['CI']}), skipped instead: {reason}"


# The longest files first (measured: seconds of the workers' time), then the integration,
# distributed and unit tiers: the workers of `pytest -n` (launch/test.sh, with
# --no-loadscope-reorder, else pytest-xdist orders files by their number of tests) take files
# in this order, so the long ones start early and the many short unit files fill the end
# instead of one worker finishing alone (the chaos run alone is ~40 s).
LONGEST_FIRST = ("test_chaos.py", "test_train_cli.py", "test_preempt.py", "test_faults.py",
                 "test_scale_measure.py", "test_parity.py", "test_node_dispatch.py",
                 "test_checkpoint_faults.py", "test_triton_compile.py", "test_bench_layer.py",
                 "test_study.py", "test_build.py")


def _order(item: pytest.Item) -> tuple[int, int]:
    path = Path(str(item.fspath))
    rank = LONGEST_FIRST.index(path.name) if path.name in LONGEST_FIRST else len(LONGEST_FIRST)
    tier = ("integration", "distributed", "unit").index(path.parent.name) \
        if path.parent.name in TIERS else len(TIERS)
    return rank, tier


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=_order)  # stable: a file's tests keep their order


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(module, names) -> {"n": calls so far of any of module's functions `names`}
    (each still runs): what checks that a kernel path was, or was not, taken."""

    def install(module, names):
        count = {"n": 0}
        for name in names:
            real = getattr(module, name)

            def spy(*a, _real=real, **k):
                count["n"] += 1
                return _real(*a, **k)

            monkeypatch.setattr(module, name, spy)
        return count

    return install
