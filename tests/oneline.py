"""The check every bad-input test makes: the call ends the process with status 2 and exactly
one line on stderr (no traceback, no usage block)."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def refused(capsys: pytest.CaptureFixture, call: Callable[[], object]) -> str:
    """Run call(); it must raise SystemExit(2) having printed one line on stderr: that line."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
