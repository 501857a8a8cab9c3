"""Logging for the process: one handler on stderr, text or JSON lines.

Text lines are ``TIME LEVEL LOGGER: MESSAGE``; ``--log-format json`` writes one
JSON object per line (for journald's ``MESSAGE`` or Loki), with the fields of
a structured record (``extra={"fields": {...}}``, as
:func:`monitor.outputs.events.emit` logs every event) as keys of the object.

APScheduler logs every job run at INFO ("Running job ...", "executed
successfully"): hundreds of lines an hour that say nothing an operator needs.
Its loggers are at WARNING unless ``-v`` is given, so a missed or failed job
is still logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: libraries whose INFO is job chatter, quiet unless verbose
CHATTY = ("apscheduler",)
#: keys of a JSON line that a record's ``fields`` may not replace
_RESERVED = frozenset({"ts", "level", "logger", "msg"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (RFC 3339, UTC, ms), ``level``, ``logger``,
    ``msg``, the record's ``fields``, and ``exc`` with the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                doc[f"field_{key}" if key in _RESERVED else str(key)] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(*, verbose: bool = False, fmt: LogFormat = "text",
              stream: TextIO | None = None) -> None:
    """Set up the root logger (replacing earlier handlers): DEBUG when ``verbose``,
    else INFO with the chatty libraries at WARNING."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
