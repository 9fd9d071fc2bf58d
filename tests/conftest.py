"""Every test carries its tier as a marker (from its folder), so a tier runs alone:

    pytest -m unit                    # one process, seconds
    pytest -m "unit or distributed"   # the fast tiers, no torchrun
    pytest -m integration             # torchrun and the real CLI, minutes

Without a GPU, the Triton kernels' tests run under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be
# chosen before the kernels are defined (at the first import of peer_dist.ops).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TIERS = ("unit", "distributed", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
