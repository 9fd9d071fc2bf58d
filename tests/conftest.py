"""Every test carries its tier as a marker (from its folder), so a tier runs alone:

    pytest -m unit                    # one process, seconds
    pytest -m "unit or distributed"   # the fast tiers, no torchrun
    pytest -m integration             # torchrun and the real CLI, minutes
"""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "distributed", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
