"""Recording an event: the one function every producer (checks, orders, exporter) calls.

An event is written, in the caller's transaction, to three places at once: the
webhook outbox (``events`` + ``webhook_deliveries``), the audit chain, and the
InfluxDB export outbox as an ``energy_event`` annotation.  Nobody is told
before the transaction commits; the senders read from these tables.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping
from typing import Any

from monitor.config import Config
from monitor.outputs import exporter, webhooks
from monitor.outputs.lineproto import event_line
from monitor.store import audit


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
    return event_id
