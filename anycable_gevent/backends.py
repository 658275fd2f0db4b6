"""Backends by name: what each family offers, readable without importing any backend.

Each family (``broker``, ``pubsub``, ``broadcast``) lists its backends in its package's
``BACKENDS`` as :class:`Backend` records: where the class lives and what it can do. The
configuration checks names and combinations against these records before anything is
built (and, with several workers, before any fork); only the composition root imports
the classes, with :func:`load`. Stdlib only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """One backend of a family."""

    #: ``"package.module:Class"``
    path: str
    #: its state or delivery is shared by every process and node (Redis)
    multi_node: bool = False
    #: a broadcaster whose every node receives each publication (no broker, no offsets)
    fanout: bool = False
    #: it talks to Redis (``--redis_url``)
    redis: bool = False


def load(backend: Backend) -> type:
    """The backend's class (imports its module)."""
    module, _, name = backend.path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not isinstance(cls, type):
        raise TypeError(f"{backend.path} is not a class")
    return cls
