"""Build the C kernels once per machine and load them.

The shared library is cached under $PEER_DIST_KERNEL_DIR (default ~/.cache/peer_dist), keyed
by the sources, the compiler (its path and version), the flags and the CPU's instruction set:
a `-march=native` build made on one CPU generation is never loaded on another that shares the
home directory (it would die with SIGILL). Concurrent builders (the ranks of a node) wait on a
file lock, so one compiles and the others load its result. If no build works the kernels fall
back to PyTorch, with one warning that shows the compiler's errors.

Why not torch.utils.cpp_extension: the kernels need no torch headers (plain C on raw pointers,
called through ctypes), and building against them is what costs. Measured on the 2-core
development machine: load_inline of a one-line op with torch/extension.h took 50.5 s (and
needs ninja); this file compiles every kernel in 1.6 s, and its cache survives torch upgrades.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("peer_kernels.c", "peer_kernels.h", "peer_optim.h")
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared")
NATIVE = "-march=native"


def cache_dir() -> Path:
    root = os.environ.get("PEER_DIST_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peer_dist")
    return Path(root)


def cpu_signature() -> str:
    """The instruction-set extensions this CPU reports (x86 flags, Arm features)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> tuple[str, str] | None:
    """(path, first line of --version) of $CC, cc or gcc; None when there is none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, (out.stdout.splitlines() or [""])[0]


def build_key(cc: tuple[str, str], flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    h.update(repr((cc, flags, platform.machine(), cpu_signature())).encode())
    return h.hexdigest()[:16]


def _compile(cc: str, flags: tuple[str, ...], out: Path) -> str | None:
    """Compile into `out`; None on success, else the compiler's error text."""
    cmd = [cc, *flags, "-I", str(CSRC), str(CSRC / "peer_kernels.c"), "-o", str(out), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()[-2000:]


def build() -> Path | str:
    """The cached library's path (built if needed, under a lock), or why it cannot be built."""
    cc = compiler()
    if cc is None:
        return "no C compiler (cc, gcc or $CC) on PATH"
    errors = []
    for flags in ((*FLAGS, NATIVE), FLAGS):  # native first; portable where native fails
        target = cache_dir() / f"peer_kernels_{build_key(cc, flags)}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine; the rest wait, then load
            if target.exists():
                return target
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                error = _compile(cc[0], flags, Path(tmp) / "k.so")
                if error is None:
                    os.replace(Path(tmp) / "k.so", target)  # atomic
                    return target
        errors.append(f"{' '.join(flags)}: {error}")
    return "the C compiler failed: " + " | ".join(errors)


class KernelLibrary:
    """The loaded library, built on first use; the switch that forces it on or off."""

    def __init__(self, declare: Callable[[ctypes.CDLL], None]):
        self._declare = declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self.enabled: bool | None = None  # None: use when it builds; False: never; True: must
        self.why_not = ""

    def get(self) -> ctypes.CDLL | None:
        if self.enabled is False:
            return None
        with self._lock:
            if not self._tried:
                self._tried = True
                self._lib = self._load()
        if self._lib is None and self.enabled:
            raise RuntimeError(f"the fused CPU kernels were requested but {self.why_not}")
        return self._lib

    def _load(self) -> ctypes.CDLL | None:
        try:
            result = build()
            if isinstance(result, Path):
                lib = ctypes.CDLL(str(result))
                self._declare(lib)
                return lib
            self.why_not = result
        except OSError as e:
            self.why_not = f"the built library could not be loaded: {e}"
        warnings.warn(f"peer_dist: fused CPU kernels unavailable ({self.why_not}); using the "
                      "PyTorch kernels (slower)", RuntimeWarning, stacklevel=3)
        return None
