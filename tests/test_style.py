"""The whole repository passes ``ruff check`` and ``ruff format --check`` (ruff pinned in the ``test`` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_is_clean(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if "No module named ruff" in proc.stderr:
        pytest.fail(
            "ruff is not installed: pip install -e '.[test]' (it pins the ruff version the repo uses)"
        )
    assert proc.returncode == 0, (
        f"ruff {' '.join(command)} (fix with `ruff check --fix .` / `ruff format .`):\n"
        + (proc.stdout + proc.stderr)[-6000:]
    )
