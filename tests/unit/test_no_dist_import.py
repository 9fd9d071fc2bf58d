"""peer_dist.model and peer_dist.ops must never import torch.distributed (parallelism is
applied from outside)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import peer_dist.model
import peer_dist.ops

MODEL_DIR = Path(peer_dist.model.__file__).parent
OPS_DIR = Path(peer_dist.ops.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    """Modules a file imports, `torch.distributed` attribute uses, and module-name strings
    (for importlib) — everything by which it could reach torch.distributed."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed"
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            names.append("torch.distributed")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.append(node.value.strip())
    return names


def test_model_sources_do_not_import_torch_distributed():
    files = sorted(MODEL_DIR.rglob("*.py")) + sorted(OPS_DIR.rglob("*.py"))
    assert files, "no model sources found"
    offenders = {}
    for path in files:
        bad = [m for m in _imported_modules(path)
               if m.startswith(("torch.distributed", "peer_dist.parallel"))]
        if bad:
            offenders[path.name] = bad
    assert not offenders, offenders


def test_importing_model_adds_no_distributed_modules():
    """In a fresh interpreter, importing peer_dist.model after torch adds no torch.distributed
    (torch itself may load some of it; only what peer_dist.model pulls in counts)."""
    code = (
        "import sys, json, torch\n"
        "before = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "import peer_dist.model\n"
        "after = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "extra = {m for m in sys.modules if m.startswith('peer_dist.parallel')}\n"
        "print(json.dumps(sorted((after - before) | extra)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
