"""Imports run one way: config <- ops <- model <- parallel <- data <- train <- tools (a module may
import its own package and any package to its left, at module level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import peer_dist

ORDER = {"errors": 0, "cli": 0, "config": 0, "ops": 1, "model": 2, "parallel": 3, "data": 4,
         "train": 5, "tools": 6}
ROOT = Path(peer_dist.__file__).parent


def package_of(module: str) -> str:
    return module.split(".")[1]


def peer_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [n for n in names[:1] if n.startswith("peer_dist.")]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("peer_dist.")]
    return out


def test_every_package_is_ranked():
    found = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert found - {"__init__"} == set(ORDER)


def test_imports_only_go_down_the_order():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        mine = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if mine == "__init__":
            continue
        for module in peer_imports(path):
            if module == "peer_dist":
                continue
            if ORDER[package_of(module)] > ORDER[mine]:
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward


def test_the_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from peer_dist.tools.scale import main\n")
    assert peer_imports(f) == ["peer_dist.tools.scale"]
