"""Broadcast benchmark for AnyCable-compatible servers: N subscribers, M HTTP broadcasts, fan-out figures.

Standard library only (no gevent), so it runs with any Python 3.9+ against any deployment.
"""

from __future__ import annotations

__version__ = "1.0"
