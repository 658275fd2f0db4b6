"""Shared fixtures: a real server per test module (the CLI in a subprocess)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

from helpers import Server  # noqa: E402

# Property tests (tests/unit/test_fuzz_*.py) are deterministic: the same examples on every
# run and every machine (derandomize), no example database left behind, no per-example
# deadline (CI machines are shared and slow). Each test sets its own max_examples.
settings.register_profile("anycable", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("anycable")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Public streams, no auth, memory broker: the RPC-less default setup for most tests."""
    with Server("--public_streams", "--noauth", "--sessions_ttl=30", "--history_ttl=60") as srv:
        yield srv


@pytest.fixture
def make_server() -> Iterator[type[Server]]:
    """Start servers with custom flags; every one started is stopped after the test."""
    started: list[Server] = []

    class Factory(Server):
        def start(self, timeout: float = 15.0, healthy: bool = True) -> Server:
            started.append(self)
            return super().start(timeout, healthy)

    yield Factory
    for srv in started:
        srv.__exit__(None, None, None)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of the test's own on the shared Redis, deleted afterwards."""
    from redis_helpers import REDIS_URL, delete_prefix, unique_prefix

    p = unique_prefix()
    yield p
    delete_prefix(REDIS_URL, p)
