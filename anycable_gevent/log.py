"""Logging setup: anycable-go-style ``key=value`` text, or one JSON object per line.

Log calls write their message as ``"what happened key=value key2=value2"`` with lazy
``%`` arguments. The text format prints that as it is, after the time and a three-letter
level, and appends the common fields (``context`` = the module, ``nodeid``, ``pid``). The
JSON format (``--log_format=json``) emits ``time``, ``level``, ``msg`` and the same fields,
with the trailing ``key=value`` pairs of the message split into fields of their own.

Secrets never reach a log line at info level or above: a connection is named there by
:func:`conn_ref` (``conn=``), a short non-reversible digest of its sid, because the sid
itself restores the session. The sid, frames and HTTP access lines appear at debug only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import sys
import time
from typing import Any, TextIO

ROOT = "anycable_gevent"

_LEVELS = {"DEBUG": "DBG", "INFO": "INF", "WARNING": "WRN", "ERROR": "ERR", "CRITICAL": "ERR"}
#: A ``key=`` that starts a field: at the start of the message or after whitespace.
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z_][A-Za-z0-9_.]*)=")
_INT = re.compile(r"^-?(0|[1-9][0-9]{0,17})$")


def conn_ref(sid: str) -> str:
    """A connection's name in logs: 8 hex chars of sha256(sid); it cannot be turned back into the sid."""
    return hashlib.sha256(sid.encode()).hexdigest()[:8]


def split_fields(message: str) -> tuple[str, dict[str, Any]]:
    """``"text k=v k2=two words"`` -> ``("text", {"k": "v", "k2": "two words"})``.

    A value runs up to the next `` key=``, so values with spaces (error messages) stay
    whole; surrounding double quotes are dropped and plain integers become numbers.
    """
    keys = list(_KEY.finditer(message))
    if not keys:
        return message, {}
    fields: dict[str, Any] = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(message)
        value = message[m.end() : end].strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        fields[m.group(1)] = int(value) if _INT.match(value) else value
    return message[: keys[0].start()].strip(), fields


#: Control characters and Unicode line breaks as visible escapes, tab excepted.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _one_line(text: str) -> str:
    # A value taken from a request (a stream name, an identifier, an error text) must not
    # forge log lines: not with a line break (\n, \r, \v, \f, \x1c-\x1e, \x85, \u2028,
    # \u2029 all end a line for some reader) nor with terminal escapes (\x1b).
    if text.isprintable():
        return text  # the common case, checked in C
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``2024-01-25 12:00:00.000 INF message k=v context=node nodeid=ab12cd pid=42``."""

    def __init__(self, context: dict[str, str]) -> None:
        super().__init__()
        self.context = " ".join(f"{k}={v}" for k, v in context.items() if v)

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        level = _LEVELS.get(record.levelname, record.levelname[:3])
        parts = [f"{ts}.{int(record.msecs):03d}", level]
        message = _one_line(record.getMessage())
        if message:
            parts.append(message)
        parts.append("context=" + record.name.rsplit(".", 1)[-1])
        if self.context:
            parts.append(self.context)
        parts.append(f"pid={record.process}")  # the process that logs: workers inherit the setup
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JSONFormatter(logging.Formatter):
    """One object per line: ``time``, ``level``, ``msg``, ``context``, common and message fields."""

    def __init__(self, context: dict[str, str]) -> None:
        super().__init__()
        # the node id stays a string even when it is all digits
        self.context: dict[str, Any] = {k: v for k, v in context.items() if v}

    def format(self, record: logging.LogRecord) -> str:
        msg, fields = split_fields(record.getMessage())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": "warn" if record.levelno == logging.WARNING else record.levelname.lower(),
            "msg": msg,
            "context": record.name.rsplit(".", 1)[-1],
        }
        out.update(self.context)
        out["pid"] = record.process
        for key, value in fields.items():
            # a message field never overwrites the envelope (a field named "time" or "msg")
            out[key if key not in ("time", "level", "msg") else f"field.{key}"] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "info", fmt: str = "text", node_id: str = "", stream: TextIO | None = None) -> str:
    """Configure the ``anycable_gevent`` loggers (the root logger is left alone).

    Returns the node id in use: ``node_id``, or a random 6-character one like anycable-go's.
    """
    node_id = node_id or secrets.token_hex(3)
    context = {"nodeid": node_id}
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JSONFormatter(context) if fmt == "json" else TextFormatter(context))
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    logger.propagate = False
    return node_id


class Throttle:
    """Logs one line per ``period`` seconds at most, for events that clients can cause at will.

    The first event of a period is logged (with its traceback when asked); the ones after
    it are counted and the count is added to the next line that gets through, so a client
    that provokes an error a thousand times a second cannot flood the log.
    """

    __slots__ = ("logger", "period", "next_at", "suppressed")

    def __init__(self, logger: logging.Logger, period: float) -> None:
        self.logger = logger
        self.period = period
        self.next_at = 0.0
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        self.next_at = now + self.period
        if self.suppressed:
            msg = f"{msg} suppressed={self.suppressed}"
            self.suppressed = 0
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any, exc_info: bool = False) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info)


def describe_frame(frame: bytes | memoryview) -> str:
    """A server frame (unmasked, as :func:`anycable_gevent.protocol.ws_frame` builds it), for debug logs."""
    data = bytes(frame[:1040])
    if len(data) < 2:
        return f"bytes={len(frame)}"
    opcode = data[0] & 0x0F
    n = data[1] & 0x7F
    start = 2 + (2 if n == 126 else 8 if n == 127 else 0)
    payload = data[start:]
    if opcode in (0x1, 0x2):
        return "frame=" + _one_line(payload[:1024].decode("utf-8", "replace"))
    if opcode == 0x8:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
        reason = _one_line(payload[2:].decode("utf-8", "replace")).replace('"', "'")
        return f'close={code} reason="{reason}"'
    return {0x9: "native=ping", 0xA: "native=pong"}.get(opcode, f"opcode={opcode}")
