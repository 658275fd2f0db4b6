"""The code stays ruff- and mypy-clean (run as part of the suite so CI enforces it)."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)


def test_ruff() -> None:
    result = _run("ruff", "check", "anycable_gevent", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", "anycable_gevent", "scripts/soaktool")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = _run("mypy", "anycable_gevent", "scripts/soaktool")
    assert result.returncode == 0, result.stdout + result.stderr
