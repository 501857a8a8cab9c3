"""What every change of an order leaves behind: its audit entry, its SPEC event, its count.

One :class:`Journal` per :class:`~monitor.act.orders.Actions`, shared by the
planning, issuing, clearing and verification modules, so an order's audit body,
event body and metric labels are written in one place.  All three go into the
caller's transaction (the metric aside): the order row and what it leaves
behind commit together.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from typing import Any

from monitor.act.model import AuditAppend, Emit, Order
from monitor.metrics import Metrics


class Journal:
    """Records order changes: ``audit_append`` (the hash chain), ``emit`` (the event for
    webhooks) and ``metrics`` (``energy_monitor_orders{action, outcome}``, when given)."""

    def __init__(self, site: str, emit: Emit, audit_append: AuditAppend,
                 metrics: Metrics | None = None) -> None:
        self.site = site
        self.emit = emit
        self.audit_append = audit_append
        self.metrics = metrics

    def count(self, action: str, outcome: str) -> None:
        """One more ``outcome`` (issued, refused, confirmed ...) for ``action``."""
        if self.metrics is not None:
            self.metrics.orders.labels(action, outcome).inc()

    def audit(self, conn: sqlite3.Connection, kind: str, o: Order, now: float,
              **extra: Any) -> None:
        """The audit entry ``kind`` (``order.issued``, ``order.confirmed`` ...) for ``o``."""
        self.audit_append(conn, kind, o.audit_body(**extra), now)

    def event(self, conn: sqlite3.Connection, o: Order, kind: str, severity: str, *,
              message: str, at: float, meters: Sequence[str] | None = None) -> None:
        """The SPEC event ``kind`` about ``o``, with the evidence of the verdict behind it
        (``meters``: the meters it is about, by default all the order's)."""
        ev = o.data.get("evidence") or {}
        body: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "kind": kind,
            "severity": severity,
            "site": self.site,
            "rule": o.rule,
            "scope": o.scope,
            "message": message,
            "value": ev.get("value"),
            "limit": ev.get("limit", o.target_kw),
            "unit": ev.get("unit", "kW" if o.target_kw is not None else ""),
            "period": ev.get("period", ""),
            "at": at,  # Unix seconds; the webhook outbox renders it as RFC 3339
            "order_id": o.order_id,
            "action": o.action,
            "meters": list(o.meters if meters is None else meters),
        }
        if "projected" in ev:
            body["projected"] = ev["projected"]
        if o.target_kw is not None:
            body["target_kw"] = o.target_kw
        if o.dry_run:
            body["dry_run"] = True
        self.emit(conn, body)
