"""Recording an event: the one function every producer (checks, orders, exporter) calls.

An event is written, in the caller's transaction, to three places at once: the
webhook outbox (``events`` + ``webhook_deliveries``), the audit chain, and the
InfluxDB export outbox as an ``energy_event`` annotation.  Nobody is told
before the transaction commits; the senders read from these tables.

Every event is also logged, one line each, with ``key=value`` fields (and the
same fields as keys of the object under ``--log-format json``), at the level
of its severity.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Mapping
from typing import Any

from monitor.config import Config
from monitor.outputs import exporter, webhooks
from monitor.outputs.lineproto import event_line
from monitor.store import audit

log = logging.getLogger(__name__)
LOG_FIELDS = ("kind", "severity", "rule", "scope", "value", "limit", "unit", "period",
              "projected", "order_id", "meters", "message", "event_id")
LEVELS = {"critical": logging.ERROR, "error": logging.ERROR, "warning": logging.WARNING}


def emit(conn: sqlite3.Connection, config: Config, event: Mapping[str, Any], now: float,
         *, deliver: bool = True) -> str:
    """Record ``event`` (SPEC webhook body fields; ``site``/``event_id``/``at`` filled in).

    ``deliver=False`` records it (events table, audit, InfluxDB annotation) without
    queueing it for the webhooks: a rule whose ``on_warn``/``on_breach`` lacks
    ``alert`` still leaves a trace, but does not page anyone.
    """
    body = dict(event)
    body.setdefault("event_id", str(uuid.uuid4()))
    body.setdefault("site", config.site.id)
    body.setdefault("at", now)
    event_id = webhooks.enqueue(conn, body, config.webhooks if deliver else (), now)
    audit_body = {k: v for k, v in body.items() if k != "at"}
    at = body["at"] if isinstance(body["at"], int | float) else now
    audit.append(conn, "event", audit_body, float(at))
    exporter.enqueue(conn, [event_line(
        config.site.id, str(body.get("kind", "")), str(body.get("rule") or ""),
        str(body.get("message", "")), float(at))])
    _log(body, event_id)
    return event_id


def _log(body: Mapping[str, Any], event_id: str) -> None:
    fields = {k: body[k] for k in LOG_FIELDS if body.get(k) not in (None, "", [])}
    fields["event_id"] = event_id
    text = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
    log.log(LEVELS.get(str(body.get("severity", "")), logging.INFO), "event %s", text,
            extra={"fields": fields})


def _text(value: Any) -> str:
    """A ``key=value`` value: JSON-quoted when it has spaces, quotes or ``=``."""
    if isinstance(value, str):
        plain = value and not any(c in value for c in ' "=\n\t\\')
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        more = f",...(+{len(value) - 20})" if len(value) > 20 else ""
        return ",".join(str(v) for v in value[:20]) + more
    return json.dumps(value, default=str)
