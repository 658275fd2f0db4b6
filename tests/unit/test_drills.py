"""The drills' exactly-once check itself (tests/drills.py): it must catch what it names."""

from __future__ import annotations

from typing import Any

from drills import check_exactly_once


def client(got: list[int], offsets: list[int] | None = None) -> dict[str, Any]:
    metas = [["e1", o] for o in (offsets if offsets is not None else range(1, len(got) + 1))]
    return {"i": 0, "stream": "s", "got": got, "metas": metas}


def check(c: dict[str, Any], attempts: dict[int, int] | None = None) -> list[str]:
    return check_exactly_once([c], {"s": [1, 2, 3]}, lambda c: c["stream"], {"s": attempts or {}})


def test_every_number_once_in_order_passes() -> None:
    assert check(client([1, 2, 3])) == []


def test_a_missing_a_duplicated_or_a_reordered_number_is_a_problem() -> None:
    assert check(client([1, 3]))
    assert check(client([1, 2, 2, 3]))
    assert check(client([2, 1, 3]))


def test_a_retried_publication_may_arrive_once_per_attempt_under_its_own_offsets() -> None:
    assert check(client([1, 2, 2, 3]), {2: 2}) == []
    assert check(client([1, 2, 2, 2, 3]), {2: 2})  # more copies than attempts
    assert check(client([1, 2, 2, 3], offsets=[1, 2, 2, 3]), {2: 2})  # one offset twice
