"""``scripts/soak`` in each topology, briefly: the tool must end with exit code 0 and a clean
summary (every accepted message received exactly once, in order, through socket kills,
restores, unsubscribe/resubscribe and, with workers, SIGKILLed workers).

The checker itself (that it does see a gap, a duplicate, a reordering) is tested without a
server in ``tests/unit/test_soaktool.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT
from redis_helpers import REDIS_URL

pytestmark = pytest.mark.slow


def soak(tmp_path: Path, topology: str, seconds: int, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{topology}.json"
    cmd = [
        str(ROOT / "scripts" / "soak"),
        f"--topology={topology}",
        f"--seconds={seconds}",
        "--clients=120",
        "--streams=12",
        "--rate=40",
        "--kill-rate=4",
        "--toggle-rate=3",
        f"--redis-url={REDIS_URL}",
        f"--workdir={tmp_path / topology}",
        f"--json={out}",
        "--quiet",
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    figures: dict[str, Any] = json.loads(out.read_text())
    assert figures["ok"], figures["checks"]
    assert figures["checked"] > 0
    assert figures["reconnects"] > 0
    assert figures["restores"] > 0
    assert figures["duplicates"] == 0
    assert figures["gaps"] == 0
    assert figures["out_of_order"] == 0
    assert "OK:" in result.stdout
    return figures


@pytest.mark.timeout(150)
def test_soak_workers_with_killed_workers(tmp_path: Path) -> None:
    figures = soak(tmp_path, "workers", 30, "--kill-workers-every=12")
    assert figures["worker_kills"] >= 1
    assert figures["redis_keys"]["end"]["session"] <= 120 + figures["reconnects"]


@pytest.mark.timeout(90)
def test_soak_memory(tmp_path: Path) -> None:
    soak(tmp_path, "memory", 10)


@pytest.mark.timeout(90)
def test_soak_nodes(tmp_path: Path) -> None:
    figures = soak(tmp_path, "nodes", 10)
    assert len(figures["servers"]) == 2
