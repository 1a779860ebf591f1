"""The code is ruff-clean and ruff-formatted (pyproject.toml's [tool.ruff]), checked with the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra: pip install -e '.[test]')")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    proc = ruff("check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_applied():
    proc = ruff("format", "--no-cache", "--check", ".")
    assert proc.returncode == 0, "run `.venv/bin/ruff format .`:\n" + proc.stdout + proc.stderr
