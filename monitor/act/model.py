"""The values every part of the orders layer shares: orders, states, plans, ids, device commands.

Pure: no SQL, no MQTT, no clock.  :class:`Order` is one row of table ``orders``
and knows its SPEC message; :class:`ShedPlan` is what :mod:`monitor.act.plan`
chose, :class:`Progress` what :mod:`monitor.act.verify` changed.  The state
names below are the values of ``orders.state`` (``docs/orders.md``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from monitor.config import ControlConfig
from monitor.core.timefmt import rfc3339

OrderAction = Literal["shutdown", "resume", "limit"]
ACTIONS: tuple[str, ...] = ("shutdown", "resume", "limit")
OFF_ACTIONS: tuple[str, ...] = ("shutdown", "limit")

# Order states (column ``orders.state``).
PENDING = "pending"  # off order published or due, waiting for the meters to fall quiet
SENT = "sent"  # resume (or an order without meters): handed to the outbox, nothing to wait for
CONFIRMED = "confirmed"  # the meters did what the order said
FAILED = "failed"  # off order not confirmed after every re-send, or refused by the rate limit
REFUSED = "refused"  # over actions.max_orders_per_hour for its scope; nothing sent
SUPERSEDED = "superseded"  # a later order took over all of its meters before it was confirmed
DRY_RUN = "dry_run"  # recorded in dry-run mode, never published

#: the window of ``actions.max_orders_per_hour``
RATE_WINDOW_S = 3600.0
#: the meter key under which an order that names no meter (a site without meters) is held
NO_METER = ""

#: ``publish(topic, payload, qos, retain)``: :meth:`monitor.intake.mqtt.MqttLink.publish`
Publish = Callable[[str, str | bytes, int, bool], object]
#: ``emit(conn, event)``: records one SPEC event body in the caller's transaction
Emit = Callable[[sqlite3.Connection, dict[str, Any]], object]
#: ``audit_append(conn, kind, body, at)``: :func:`monitor.store.audit.append`
AuditAppend = Callable[[sqlite3.Connection, str, Mapping[str, Any], float], object]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class ActionsError(Exception):
    """A request the actions layer cannot carry out (unknown scope or action, no
    transaction where one is required)."""


def require_transaction(conn: sqlite3.Connection, what: str) -> None:
    """Raise :class:`ActionsError` unless ``conn`` is inside a transaction."""
    if not conn.in_transaction:
        raise ActionsError(f"{what} must run inside the caller's transaction "
                           "(BEGIN IMMEDIATE ... COMMIT), so the order, its audit entry "
                           "and its events commit together")


def dumps(value: Any) -> str:
    """Compact, sorted JSON (order messages, device commands, ``orders.data``)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def kw(power_w: float) -> str:
    """``1234.0`` W as ``1.2 kW``, for messages."""
    return f"{power_w / 1000.0:.1f} kW"


def listing(names: Sequence[str], limit: int = 10) -> str:
    """At most ``limit`` names, then how many more, for messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- ids


class UlidFactory:
    """ULIDs (48-bit millisecond time + 80 random bits, Crockford base32, 26 chars).

    Strictly increasing within one process even for equal or backward times
    (the random part is incremented), so ids sort in issue order.  Thread-safe.
    """

    def __init__(self, randbytes: Callable[[int], bytes] = os.urandom) -> None:
        self._randbytes = randbytes
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self, now: float) -> str:
        ms = max(0, int(now * 1000))
        with self._lock:
            if ms <= self._last_ms:
                ms, rand = self._last_ms, self._last_rand + 1
                if rand >= 1 << 80:
                    ms, rand = ms + 1, 0
            else:
                rand = int.from_bytes(self._randbytes(10), "big")
            self._last_ms, self._last_rand = ms, rand
        value = ((ms & ((1 << 48) - 1)) << 80) | rand
        return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Order:
    """One row of ``orders``.  Times are Unix seconds; ``meters`` in the order's own
    sequence (a limit order: the order in which they were chosen to be shed)."""

    order_id: str
    action: str
    scope: str
    meters: tuple[str, ...]
    rule: str
    reason: str
    issued_at: float
    state: str
    resends: int = 0
    deadline: float | None = None
    target_kw: float | None = None
    actor: str = "daemon"
    dry_run: bool = False
    updated_at: float = 0.0
    publish_due: float | None = None
    published_at: float | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def off(self) -> bool:
        """Whether the order switches load off (shutdown, limit)."""
        return self.action in OFF_ACTIONS

    def payload(self, meters: Sequence[str] | None = None, attempt: int = 1) -> dict[str, Any]:
        """The SPEC order JSON; ``meters`` narrows it to the meters still held (re-sends)."""
        body: dict[str, Any] = {
            "order_id": self.order_id,
            "action": self.action,
            "scope": self.scope,
            "meters": list(self.meters if meters is None else meters),
            "rule": self.rule,
            "reason": self.reason,
            "issued_at": rfc3339(self.issued_at),
            "attempt": attempt,
        }
        if self.target_kw is not None:
            body["target_kw"] = self.target_kw
        return body

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``energy-monitor orders list`` (``id`` and ``order_id`` are the same)."""
        return {
            "id": self.order_id,
            "order_id": self.order_id,
            "action": self.action,
            "scope": self.scope,
            "meters": list(self.meters),
            "rule": self.rule,
            "state": self.state,
            "issued_at": rfc3339(self.issued_at),
            "resends": self.resends,
            "dry_run": self.dry_run,
            "actor": self.actor,
            "target_kw": self.target_kw,
            "reason": self.reason,
            "deadline": None if self.deadline is None else rfc3339(self.deadline),
            "published_at": None if self.published_at is None else rfc3339(self.published_at),
            "updated_at": rfc3339(self.updated_at),
        }

    def audit_body(self, **extra: Any) -> dict[str, Any]:
        """The body of this order's audit entries, with ``extra`` fields of the change."""
        body: dict[str, Any] = {
            "order_id": self.order_id, "action": self.action, "scope": self.scope,
            "meters": list(self.meters), "rule": self.rule, "reason": self.reason,
            "issued_at": self.issued_at, "state": self.state, "actor": self.actor,
            "dry_run": self.dry_run, "resends": self.resends,
        }
        if self.target_kw is not None:
            body["target_kw"] = self.target_kw
        body.update(extra)
        return body


@dataclass(frozen=True)
class MeterPower:
    """A meter's last reading as the intake left it in table ``meters``."""

    power_w: float | None
    last_seen: float | None


@dataclass(frozen=True)
class ShedPlan:
    """What a limit order switches off: ``shed`` meters in the order chosen."""

    shed: tuple[str, ...]
    before_w: float  # scope power counted before shedding (held-off meters as 0)
    after_w: float  # what remains after shedding
    target_w: float

    @property
    def reaches_target(self) -> bool:
        return self.after_w <= self.target_w + 1e-6


@dataclass
class Progress:
    """What one verification pass changed (order ids)."""

    confirmed: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    violations: list[tuple[str, str]] = field(default_factory=list)  # (order_id, meter)

    def __bool__(self) -> bool:
        return bool(self.confirmed or self.resent or self.failed or self.superseded
                    or self.violations)


# --------------------------------------------------------------------------- device commands


def device_command(control: ControlConfig, meter_id: str, on: bool,
                   order_id: str) -> tuple[str, str]:
    """The device's own command (topic, payload) switching ``meter_id`` on or off.

    ``control.topic`` is the full command topic for ``tasmota`` (``cmnd/pow7/POWER``),
    ``shelly_gen1`` (``shellies/<id>/relay/<n>/command``) and ``json``; for
    ``shelly_gen2`` it may be the device prefix or ``<prefix>/rpc``, for
    ``zigbee2mqtt`` ``zigbee2mqtt/<name>`` or ``zigbee2mqtt/<name>/set``.
    """
    kind, topic = control.kind, control.topic
    if kind == "tasmota":
        return topic, "ON" if on else "OFF"
    if kind == "shelly_gen1":
        return topic, "on" if on else "off"
    if kind == "shelly_gen2":
        rpc = topic if topic.endswith("/rpc") else f"{topic}/rpc"
        return rpc, dumps({"id": 1, "src": "energy-monitor", "method": "Switch.Set",
                           "params": {"id": control.channel, "on": on}})
    if kind == "zigbee2mqtt":
        target = topic if topic.endswith("/set") else f"{topic}/set"
        return target, dumps({"state": "ON" if on else "OFF"})
    return topic, dumps({"action": "resume" if on else "shutdown", "meter": meter_id,
                         "order_id": order_id})
