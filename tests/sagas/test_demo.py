"""``sagas demo`` as an installed command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_demo_runs_from_any_folder(tmp_path: Path) -> None:
    """`sagas demo` finds the examples it runs in the installed package, not in the current folder."""
    result = subprocess.run(
        [sys.executable, "-m", "sagas", "demo", "--shares", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every share mailed exactly once" in result.stdout
    assert "every upload ended with the expected outcome" in result.stdout
