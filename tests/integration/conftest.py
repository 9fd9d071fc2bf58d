"""Session fixture for the integration tier (helpers live in train_cli_helpers.py)."""

from __future__ import annotations

import pytest
from train_cli_helpers import Runs


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("integration"))
