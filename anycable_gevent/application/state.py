"""Channel and connection state: AnyCable's string maps seen as Python values.

On the wire a state map (``env.istate`` of one subscription, ``env.cstate`` of a
connection) maps keys to strings, and a reply carries only changes, where an empty
string deletes a key (SPEC §8.3). :class:`State` decodes each value as JSON (as
anycable-rails and serverless-js store them), lets the application read and write plain
Python values, and computes the changes to send back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any


def encode(value: Any) -> str:
    """Compact JSON, key order kept: the encoding of state values, identifiers and transmissions.

    Raises:
        TypeError: ``value`` is not JSON-serializable.
        ValueError: ``value`` contains NaN or an infinity (not JSON).
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode(raw: str) -> Any:
    """A state value: its JSON value, or the string itself when it is not JSON.

    Other backends may have stored plain strings (serverless-js 0.1.0 does for cstate);
    they read as strings and are left untouched unless the application changes them.
    """
    try:
        return json.loads(raw, parse_constant=_not_json)
    except ValueError:
        return raw


def _not_json(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (Python's parser accepts them by default)."""
    raise ValueError(f"{name} is not JSON")


class State(MutableMapping[str, Any]):
    """One state map with JSON values; :meth:`changes` is what the reply must carry.

    Changes are found by comparing encodings when the reply is built, so values mutated
    in place (``state["items"].append(x)``) are saved too. Keys starting with
    ``reserved`` (``"$"`` for channel state: ``$w`` and ``$p`` belong to the server's
    whisper and presence features) are hidden from the mapping and cannot be set.

    Not thread-safe: one instance belongs to one RPC request.
    """

    def __init__(self, raw: Mapping[str, str] | None = None, *, reserved: str = "") -> None:
        self._reserved = reserved
        #: The canonical encoding of every key received, to tell what changed.
        self._before: dict[str, str] = {}
        self._values: dict[str, Any] = {}
        for key, value in (raw or {}).items():
            if not value or (reserved and key.startswith(reserved)):
                continue
            self._values[key] = decoded = decode(value)
            self._before[key] = encode(decoded)

    def _check(self, key: str) -> None:
        if not isinstance(key, str):
            raise TypeError(f"state keys are strings, not {type(key).__name__}")
        if self._reserved and key.startswith(self._reserved):
            raise KeyError(f"state keys starting with {self._reserved!r} are reserved: {key!r}")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key)
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"State({self._values!r})"

    def changes(self) -> dict[str, str]:
        """Keys whose value changed (JSON-encoded), and deleted keys mapped to ``""``.

        Raises:
            TypeError: a value cannot be encoded as JSON (the message names the key).
        """
        out: dict[str, str] = {}
        for key, value in self._values.items():
            try:
                encoded = encode(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"state key {key!r}: {exc}") from None
            if self._before.get(key) != encoded:
                out[key] = encoded
        for key in self._before:
            if key not in self._values:
                out[key] = ""
        return out
