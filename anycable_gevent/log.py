"""Logging setup: anycable-go-style ``key=value`` text, or one JSON object per line.

Messages are written as ``"what happened key=value key2=value2"``; the text format
prints them as they are, the JSON format splits the trailing ``key=value`` pairs into
fields. Secrets never reach a log line: connections are named by a short non-reversible
reference (``conn=``) at info level and above; the sid appears only at debug level.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

_KV = re.compile(r"\s([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S*)")
_LEVELS = {"DEBUG": "DBG", "INFO": "INF", "WARNING": "WRN", "ERROR": "ERR", "CRITICAL": "ERR"}


def split_fields(message: str) -> tuple[str, dict[str, str]]:
    """``"text k=v k2=v2"`` -> ``("text", {"k": "v", "k2": "v2"})`` (trailing pairs only)."""
    fields: dict[str, str] = {}
    first = None
    for m in _KV.finditer(message):
        if first is None:
            first = m.start()
        fields[m.group(1)] = m.group(2).strip('"')
    if first is None:
        return message, {}
    return message[:first], fields


class TextFormatter(logging.Formatter):
    def __init__(self, context: dict[str, str]) -> None:
        super().__init__()
        self.context = " ".join(f"{k}={v}" for k, v in context.items() if v)

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        ms = int(record.msecs)
        level = _LEVELS.get(record.levelname, record.levelname[:3])
        text = f"{ts}.{ms:03d} {level} {record.getMessage()}"
        component = record.name.rsplit(".", 1)[-1]
        text += f" context={component}"
        if self.context:
            text += " " + self.context
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JSONFormatter(logging.Formatter):
    def __init__(self, context: dict[str, str]) -> None:
        super().__init__()
        self.context = {k: v for k, v in context.items() if v}

    def format(self, record: logging.LogRecord) -> str:
        msg, fields = split_fields(record.getMessage())
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower().replace("warning", "warn"),
            "msg": msg,
            "context": record.name.rsplit(".", 1)[-1],
        }
        out.update(self.context)
        out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", node_id: str = "", stream: Any = None) -> None:
    """Configure the ``anycable_gevent`` loggers once (the root logger is left alone)."""
    context = {"nodeid": node_id, "pid": str(os.getpid())}
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JSONFormatter(context) if fmt == "json" else TextFormatter(context))
    logger = logging.getLogger("anycable_gevent")
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    logger.propagate = False
