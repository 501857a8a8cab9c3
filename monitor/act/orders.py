"""Orders: shutdown, resume and limit orders over MQTT, verified by metered power.

One :class:`Actions` per daemon, shared by the scheduler's job threads (each
passes its own connection).  The contract with the rest of the daemon:

* :meth:`Actions.order`, :meth:`Actions.on_clear`, :meth:`Actions.resume` and
  :meth:`Actions.verify` write inside the **caller's transaction** (they raise
  :class:`ActionsError` when ``conn`` has none): the ``orders`` row, the
  ``order_meters`` rows, the audit entries and the events commit together or
  not at all.  They publish nothing.
* :meth:`Actions.publish_pending` publishes, **after the commit** (it refuses
  to run inside a transaction): every live order whose ``publish_due`` is set
  and due.  It clears ``publish_due`` only once the broker has acknowledged
  every message of the order (QoS 1 PUBACK), so a crash between the commit
  and the publication, or a broker outage, re-sends on the next call -- at
  least once, never lost.  Call it right after committing an order, from a
  periodic job, and once at start-up.  :meth:`Actions.tick` is that job:
  ``verify`` in its own transaction, then ``publish_pending``.
* ``mode = "dry_run"`` records orders (``state 'dry_run'``, ``dry_run = 1``) and
  their events, and publishes nothing at all.

Which order is *in force* for a meter: the latest non-refused order that
names it (table ``order_meters``).  A re-send or a late publication only
addresses the meters its order still holds, so an old ``OFF`` can never
overtake a newer ``ON``.  Details, states and message formats:
``docs/orders.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from monitor.config import Config, ControlConfig, MeterConfig
from monitor.core.timefmt import rfc3339
from monitor.core.verdict import Verdict
from monitor.intake.mqtt import MqttError, orders_topic
from monitor.metrics import Metrics
from monitor.store import audit
from monitor.store.db import transaction

log = logging.getLogger(__name__)

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

RATE_WINDOW_S = 3600.0
#: how long publish_pending waits for the broker's PUBACKs of one order
ACK_TIMEOUT_S = 5.0
#: a publication that failed (broker down) is tried again after this long
PUBLISH_RETRY_S = 10.0
#: the meter key under which an order that names no meter (a site without meters) is held
NO_METER = ""
_UNSET: Any = object()

Publish = Callable[[str, str | bytes, int, bool], object]
Emit = Callable[[sqlite3.Connection, dict[str, Any]], object]
AuditAppend = Callable[[sqlite3.Connection, str, Mapping[str, Any], float], object]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class ActionsError(Exception):
    """A request the actions layer cannot carry out (unknown scope or action, no
    transaction where one is required)."""


# --------------------------------------------------------------------------- ids, times


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


def _kw(power_w: float) -> str:
    return f"{power_w / 1000.0:.1f} kW"


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


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


_COLS = ("order_id, action, scope, meters, rule, reason, issued_at, state, resends, deadline,"
         " target_kw, actor, dry_run, updated_at, publish_due, published_at, data")


def _order(row: Sequence[Any]) -> Order:
    (oid, action, scope, meters, rule, reason, issued_at, state, resends, deadline, target_kw,
     actor, dry_run, updated_at, publish_due, published_at, data) = row
    try:
        names = json.loads(meters or "[]")
    except ValueError:
        names = []
    try:
        extra = json.loads(data or "{}")
    except ValueError:
        extra = {}
    return Order(
        order_id=str(oid), action=str(action), scope=str(scope),
        meters=tuple(str(m) for m in names) if isinstance(names, list) else (),
        rule=str(rule), reason=str(reason), issued_at=float(issued_at), state=str(state),
        resends=int(resends), deadline=None if deadline is None else float(deadline),
        target_kw=None if target_kw is None else float(target_kw), actor=str(actor),
        dry_run=bool(dry_run), updated_at=float(updated_at),
        publish_due=None if publish_due is None else float(publish_due),
        published_at=None if published_at is None else float(published_at),
        data=extra if isinstance(extra, dict) else {},
    )


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
    """What one :meth:`Actions.verify` pass changed (order ids)."""

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
        return rpc, _dumps({"id": 1, "src": "energy-monitor", "method": "Switch.Set",
                            "params": {"id": control.channel, "on": on}})
    if kind == "zigbee2mqtt":
        target = topic if topic.endswith("/set") else f"{topic}/set"
        return target, _dumps({"state": "ON" if on else "OFF"})
    return topic, _dumps({"action": "resume" if on else "shutdown", "meter": meter_id,
                          "order_id": order_id})


# --------------------------------------------------------------------------- actions


class Actions:
    """Issues, publishes and verifies orders.  Thread-safe: share one instance, give
    each thread its own connection.

    ``publish(topic, payload, qos, retain)`` is :meth:`monitor.intake.mqtt.MqttLink.publish`
    (``None``: record only, e.g. in a CLI process; the daemon publishes later).
    ``emit(conn, event)`` records one SPEC event body (the daemon's calls
    ``webhooks.enqueue``) inside the caller's transaction.  Order changes are also
    written to the audit log here (``audit_append``), so ``emit`` need not.
    ``connected()``, when given, gates publishing: while it is False nothing is
    handed to the client (paho would queue duplicates in memory).  ``metrics``,
    when given, counts outcomes in ``energy_monitor_orders{action, outcome}``.
    """

    def __init__(
        self,
        config: Config,
        publish: Publish | None,
        emit: Emit,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[float], str] | None = None,
        audit_append: AuditAppend = audit.append,
        connected: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        retry_s: float = PUBLISH_RETRY_S,
    ) -> None:
        self.config = config
        self.cfg = config.actions
        self.publish = publish
        self.emit = emit
        self.clock = clock
        self.new_id = new_id or UlidFactory()
        self.audit_append = audit_append
        self.connected = connected
        self.metrics = metrics
        self.ack_timeout_s = ack_timeout_s
        self.retry_s = retry_s
        self.site = config.site.id
        self.topic = orders_topic(config.site.id)
        self._meters: dict[str, MeterConfig] = {m.id: m for m in config.meters}
        self._publish_lock = threading.Lock()

    def _count(self, action: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.orders.labels(action, outcome).inc()

    @property
    def dry_run(self) -> bool:
        return self.cfg.mode == "dry_run"

    # ------------------------------------------------------------------ scopes, power

    def resolve(self, scope: str, conn: sqlite3.Connection | None = None) -> tuple[str, ...]:
        """The meter ids of ``scope`` (``site``, ``group:NAME``, ``meter:ID``), from the config.

        ``site`` is every configured meter; a site without ``[[meters]]`` uses every
        meter the store has seen (``conn`` needed).  Raises :class:`ActionsError`
        for an unknown group or meter.
        """
        kind, _, name = scope.partition(":")
        if scope == "site":
            if self._meters or conn is None:
                return tuple(self._meters)
            return tuple(str(r[0]) for r in conn.execute("SELECT id FROM meters ORDER BY id"))
        if kind == "group" and name:
            found = tuple(m.id for m in self.config.meters if m.group == name)
            if not found:
                raise ActionsError(f"scope {scope!r}: no meter is in group {name!r}")
            return found
        if kind == "meter" and name:
            if name not in self._meters:
                raise ActionsError(f"scope {scope!r}: no [[meters]] entry with id {name!r}")
            return (name,)
        raise ActionsError(f"scope {scope!r}: expected site, group:NAME or meter:ID")

    @staticmethod
    def power(conn: sqlite3.Connection) -> dict[str, MeterPower]:
        """Every meter's last power and time, as the intake last committed them."""
        return {
            str(mid): MeterPower(None if p is None else float(p),
                                 None if seen is None else float(seen))
            for mid, p, seen in conn.execute("SELECT id, power_w, last_seen FROM meters")
        }

    def _estimate_w(self, meter: str, power: Mapping[str, MeterPower]) -> float:
        """Last power; unknown power counts as the meter's rating (it may be drawing)."""
        p = power.get(meter)
        if p is not None and p.power_w is not None:
            return max(0.0, p.power_w)
        mc = self._meters.get(meter)
        return mc.rated_kw * 1000.0 if mc is not None and mc.rated_kw else 0.0

    @staticmethod
    def owners(conn: sqlite3.Connection, dry_run: bool) -> dict[str, str]:
        """meter -> the id of the order in force for it."""
        return {str(m): str(o) for m, o in conn.execute(
            "SELECT meter, order_id FROM order_meters WHERE dry_run = ?", (int(dry_run),))}

    def _held_off(self, conn: sqlite3.Connection, dry_run: bool) -> set[str]:
        """Meters whose order in force is an off order still in effect (pending, confirmed;
        in dry-run mode: recorded)."""
        states = (DRY_RUN,) if dry_run else (PENDING, CONFIRMED)
        marks = ",".join("?" * len(states))
        return {str(r[0]) for r in conn.execute(
            "SELECT om.meter FROM order_meters om JOIN orders o ON o.order_id = om.order_id"
            f" WHERE om.dry_run = ? AND o.action IN ('shutdown', 'limit') AND o.state IN ({marks})",
            (int(dry_run), *states))}

    def plan_shed(self, conn: sqlite3.Connection, scope: str, target_kw: float) -> ShedPlan:
        """Which meters of ``scope`` to switch off so that its power is at most ``target_kw``.

        Meters already held off by an off order in force count as 0 W and are not
        chosen again.  Groups in ``actions.shed_priority`` are shed first, whole,
        in the listed order; then the other meters one by one, highest power first
        (ties by id).  Shedding stops as soon as the rest is at most the target;
        meters drawing nothing are never chosen.  Power is the last ``power_w``
        of table ``meters`` (unknown: the meter's ``rated_kw``, else 0).
        """
        members = self.resolve(scope, conn)
        power = self.power(conn)
        held = self._held_off(conn, self.dry_run)
        watts = {m: 0.0 if m in held else self._estimate_w(m, power) for m in members}
        target_w = max(0.0, target_kw) * 1000.0
        before = remaining = sum(watts.values())
        shed: list[str] = []
        free = [m for m in members if m not in held]
        for group in self.cfg.shed_priority:
            if remaining <= target_w + 1e-6:
                break
            unit = [m for m in free if m not in shed and self._group(m) == group]
            unit_w = sum(watts[m] for m in unit)
            if unit_w > 0:
                shed.extend(unit)
                remaining -= unit_w
        rest = sorted((m for m in free if m not in shed and watts[m] > 0),
                      key=lambda m: (-watts[m], m))
        for m in rest:
            if remaining <= target_w + 1e-6:
                break
            shed.append(m)
            remaining -= watts[m]
        return ShedPlan(tuple(shed), before, max(0.0, remaining), target_w)

    def _group(self, meter: str) -> str:
        mc = self._meters.get(meter)
        return mc.group if mc is not None else ""

    # ------------------------------------------------------------------ issuing

    def order(
        self,
        conn: sqlite3.Connection,
        action: str,
        scope: str,
        rule: str,
        reason: str,
        now: float,
        target_kw: float | None = None,
        actor: str = "daemon",
        *,
        evidence: Mapping[str, Any] | None = None,
    ) -> Order | None:
        """Record an order for ``scope`` (inside the caller's transaction; publishes nothing).

        ``limit`` needs ``target_kw``: it becomes an off order for the meters
        :meth:`plan_shed` picks, recorded with ``target_kw``.  ``evidence``
        (``value``, ``limit``, ``unit``, ``period``, ``projected`` of the verdict)
        is carried into the events.

        Returns the new order (state ``pending``, ``sent`` or ``dry_run``); the
        refused order (state ``refused``) when the scope had
        ``actions.max_orders_per_hour`` orders in the last hour -- a repeated
        refusal within that hour returns the first one, counted in its
        ``data["repeats"]``; ``None`` when there is nothing to do: every meter is
        already under an identical order in force (pending or confirmed), or a
        limit needs no meter switched off.  Orders of an ``actor`` other than
        ``daemon`` are never de-duplicated nor refused (an operator is in the loop).
        After committing, call :meth:`publish_pending`.
        """
        self._require_transaction(conn, "order()")
        if action not in ACTIONS:
            raise ActionsError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        dry = self.dry_run
        data: dict[str, Any] = {}
        if evidence:
            data["evidence"] = {k: evidence[k] for k in ("value", "limit", "unit", "period",
                                                         "projected") if k in evidence}
        if action == "limit":
            if target_kw is None or not math.isfinite(target_kw):
                raise ActionsError("a limit order needs a finite target_kw")
            plan = self.plan_shed(conn, scope, target_kw)
            if not plan.shed:
                log.info("limit %s to %.1f kW (rule %s): nothing to switch off (%s now)",
                         scope, target_kw, rule, _kw(plan.before_w))
                return None
            meters = plan.shed
            data["shed"] = {"before_w": round(plan.before_w, 1), "after_w": round(plan.after_w, 1),
                            "reaches_target": plan.reaches_target}
        else:
            meters = self.resolve(scope, conn)
            target_kw = None
        if actor == "daemon":
            if self._duplicate(conn, action, meters, dry):
                log.debug("%s %s (rule %s): identical order already in force", action, scope,
                          rule)
                return None
            recent = conn.execute(
                "SELECT count(*), min(issued_at) FROM orders WHERE scope = ? AND dry_run = ?"
                " AND issued_at > ? AND state != ?",
                (scope, int(dry), now - RATE_WINDOW_S, REFUSED)).fetchone()
            if int(recent[0]) >= self.cfg.max_orders_per_hour:
                return self._refuse(conn, action=action, scope=scope, meters=meters, rule=rule,
                                    reason=reason, now=now, target_kw=target_kw,
                                    reopens_at=float(recent[1]) + RATE_WINDOW_S, data=data)
        return self._issue(conn, action=action, scope=scope, meters=meters, rule=rule,
                           reason=reason, now=now, target_kw=target_kw, actor=actor, data=data)

    def _duplicate(self, conn: sqlite3.Connection, action: str, meters: Sequence[str],
                   dry: bool) -> bool:
        if not meters:
            return False
        owners = self.owners(conn, dry)
        ids = {owners.get(m) for m in meters}
        if None in ids:
            return False
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"SELECT action, state FROM orders WHERE order_id IN ({marks})",
                            tuple(ids)).fetchall()
        if len(rows) != len(ids):
            return False
        if action in OFF_ACTIONS:
            live = (DRY_RUN,) if dry else (PENDING, CONFIRMED)
            return all(a in OFF_ACTIONS and s in live for a, s in rows)
        live = (DRY_RUN,) if dry else (SENT, CONFIRMED)
        return all(a == "resume" and s in live for a, s in rows)

    def _issue(self, conn: sqlite3.Connection, *, action: str, scope: str,
               meters: Sequence[str], rule: str, reason: str, now: float,
               target_kw: float | None, actor: str, data: dict[str, Any]) -> Order:
        dry = self.dry_run
        off = action in OFF_ACTIONS
        if dry:
            state, deadline, due = DRY_RUN, None, None
        elif off and meters:
            state, deadline, due = PENDING, now + self.cfg.confirm_within_s, now
        else:
            state, deadline, due = SENT, None, now
        order = Order(order_id=self.new_id(now), action=action, scope=scope,
                      meters=tuple(meters), rule=rule, reason=reason, issued_at=now,
                      state=state, deadline=deadline, target_kw=target_kw, actor=actor,
                      dry_run=dry, updated_at=now, publish_due=due, data=data)
        self._insert(conn, order)
        conn.executemany(
            "INSERT INTO order_meters (meter, dry_run, order_id) VALUES (?, ?, ?)"
            " ON CONFLICT (meter, dry_run) DO UPDATE SET order_id = excluded.order_id",
            [(m, int(dry), order.order_id) for m in (meters or (NO_METER,))])
        kind = "operator.resume" if actor != "daemon" and action == "resume" else "order.issued"
        self.audit_append(conn, kind, self._audit_body(order), now)
        what = f"{action} of {scope}"
        if action == "limit":
            shed = data.get("shed", {})
            what = (f"limit {scope} to {target_kw:g} kW: switch off {len(meters)} meter(s), "
                    f"{_kw(float(shed.get('before_w', 0)))} -> "
                    f"{_kw(float(shed.get('after_w', 0)))}")
        by = f"rule {rule}" if rule else f"{actor}"
        if meters:
            what += f" ({_listing(list(meters))})"
        else:
            what += " (no meters known: cannot be verified)"
        message = f"{what} ordered by {by}: {reason}" if reason else f"{what} ordered by {by}"
        if dry:
            message = f"[dry run, not sent] {message}"
        severity = "warning" if off else "info"
        self._event(conn, order, "order.issued", severity, message=message, at=now)
        self._count(action, "dry_run" if dry else "issued")
        log.log(logging.WARNING if off else logging.INFO, "order %s: %s", order.order_id, message)
        return order

    def _refuse(self, conn: sqlite3.Connection, *, action: str, scope: str,
                meters: Sequence[str], rule: str, reason: str, now: float,
                target_kw: float | None, reopens_at: float, data: dict[str, Any]) -> Order:
        dry = self.dry_run
        row = conn.execute(
            f"SELECT {_COLS} FROM orders WHERE scope = ? AND action = ? AND dry_run = ?"
            " AND state = ? AND issued_at > ? ORDER BY issued_at DESC, order_id DESC LIMIT 1",
            (scope, action, int(dry), REFUSED, now - RATE_WINDOW_S)).fetchone()
        limit = self.cfg.max_orders_per_hour
        if row is not None:
            first = _order(row)
            repeats = int(first.data.get("repeats", 0)) + 1
            conn.execute("UPDATE orders SET data = ?, updated_at = ? WHERE order_id = ?",
                         (_dumps({**first.data, "repeats": repeats}), now, first.order_id))
            log.warning("%s of %s (rule %s) refused again (%d times since %s): more than %d "
                        "orders for this scope in the last hour", action, scope, rule, repeats,
                        rfc3339(first.issued_at), limit)
            return _order(conn.execute(f"SELECT {_COLS} FROM orders WHERE order_id = ?",
                                       (first.order_id,)).fetchone())
        data = {**data, "reopens_at": reopens_at}
        order = Order(order_id=self.new_id(now), action=action, scope=scope,
                      meters=tuple(meters), rule=rule, reason=reason, issued_at=now,
                      state=REFUSED, target_kw=target_kw, dry_run=dry, updated_at=now, data=data)
        self._insert(conn, order)
        self.audit_append(conn, "order.refused", self._audit_body(order), now)
        message = (f"{action} of {scope} REFUSED, nothing sent: already {limit} orders for this "
                   f"scope in the last hour (actions.max_orders_per_hour); the load is NOT "
                   f"switched; the next order is possible after {rfc3339(reopens_at)}")
        if reason:
            message += f". Reason given: {reason}"
        self._event(conn, order, "order.failed",
                    "critical" if action in OFF_ACTIONS else "warning", message=message, at=now)
        log.error("order %s: %s", order.order_id, message)
        self._count(action, "refused")
        return order

    def _insert(self, conn: sqlite3.Connection, o: Order) -> None:
        conn.execute(
            f"INSERT INTO orders ({_COLS}) VALUES ({', '.join('?' * 17)})",
            (o.order_id, o.action, o.scope, _dumps(list(o.meters)), o.rule, o.reason, o.issued_at,
             o.state, o.resends, o.deadline, o.target_kw, o.actor, int(o.dry_run), o.updated_at,
             o.publish_due, o.published_at, _dumps(dict(o.data))))

    @staticmethod
    def _audit_body(o: Order, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "order_id": o.order_id, "action": o.action, "scope": o.scope,
            "meters": list(o.meters), "rule": o.rule, "reason": o.reason,
            "issued_at": o.issued_at, "state": o.state, "actor": o.actor,
            "dry_run": o.dry_run, "resends": o.resends,
        }
        if o.target_kw is not None:
            body["target_kw"] = o.target_kw
        body.update(extra)
        return body

    def _event(self, conn: sqlite3.Connection, o: Order, kind: str, severity: str, *,
               message: str, at: float, meters: Sequence[str] | None = None) -> None:
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
            "at": at,  # Unix seconds; webhooks.enqueue renders it as RFC 3339
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

    # ------------------------------------------------------------------ rules' side

    def apply(self, conn: sqlite3.Connection, verdict: Verdict, actions: Iterable[str],
              breach_cleared: bool, now: float) -> list[Order]:
        """Carry out what one alert step asked for (``monitor.rules.alerts.on_actions``):
        ``shutdown`` and/or ``limit`` of the verdict's scope, then the resume logic of
        :meth:`on_clear` when a breach cleared.  In the caller's transaction.

        ``shutdown`` wins over ``limit``; a ``limit`` whose verdict has no
        ``target_kw`` is carried out as a shutdown (logged)."""
        wanted = set(actions)
        evidence = {"value": verdict.value, "limit": verdict.limit, "unit": verdict.unit,
                    "period": verdict.period, "projected": verdict.projected}
        out: list[Order | None] = []
        if "shutdown" in wanted or ("limit" in wanted and verdict.target_kw is None):
            if "shutdown" not in wanted:
                log.warning("rule %s asks for a limit of %s without a target: ordering a shutdown",
                            verdict.rule, verdict.scope)
            out.append(self.order(conn, "shutdown", verdict.scope, verdict.rule, verdict.message,
                                  now, evidence=evidence))
        elif "limit" in wanted:
            out.append(self.order(conn, "limit", verdict.scope, verdict.rule, verdict.message,
                                  now, target_kw=verdict.target_kw, evidence=evidence))
        if breach_cleared:
            out.extend(self.on_clear(conn, verdict.rule, verdict.scope, now))
        return [o for o in out if o is not None]

    def on_clear(self, conn: sqlite3.Connection, rule: str, scope: str, now: float) -> list[Order]:
        """A breach of ``rule`` on ``scope`` cleared (in the caller's transaction).

        The meters that this rule's off orders for ``scope`` still hold are resumed
        when ``actions.auto_resume`` is set -- except meters that another rule,
        still in breach with a ``shutdown``/``limit`` action, covers.  Otherwise (and
        for those kept off) an ``order.held`` event tells the operator what stays
        off and how to resume it.  Returns the resume orders issued.
        """
        self._require_transaction(conn, "on_clear()")
        dry = self.dry_run
        rows = conn.execute(
            "SELECT om.meter, o.order_id FROM order_meters om JOIN orders o"
            " ON o.order_id = om.order_id WHERE om.dry_run = ? AND o.rule = ? AND o.scope = ?"
            " AND o.action IN ('shutdown', 'limit') AND o.state NOT IN (?, ?)",
            (int(dry), rule, scope, REFUSED, SUPERSEDED)).fetchall()
        held = {str(m): str(o) for m, o in rows if m != NO_METER}
        if not held:
            return []
        order_ids = sorted(set(held.values()))
        members = [m for m in self.resolve(scope, conn) if m in held]
        members += sorted(m for m in held if m not in members)
        blocked = self._blocked(conn, rule, scope, members)
        free = [m for m in members if m not in blocked]
        anchor = _order(conn.execute(f"SELECT {_COLS} FROM orders WHERE order_id = ?",
                                     (order_ids[-1],)).fetchone())
        issued: list[Order] = []
        if self.cfg.auto_resume and free:
            result = self._auto_resume(conn, scope, free, rule, now)
            if result is not None:
                issued.append(result)
        kept = list(members) if not self.cfg.auto_resume else [m for m in members if m in blocked]
        if kept:
            why = "; ".join(f"{m}: rule {blocked[m]} still in breach" for m in kept if m in blocked)
            if self.cfg.auto_resume:
                message = (f"rule {rule} cleared on {scope}, but {len(kept)} meter(s) stay off "
                           f"({why})")
            else:
                message = (f"rule {rule} cleared on {scope}; {len(kept)} meter(s) stay off "
                           f"({_listing(kept)}) until an operator resumes them: "
                           f"energy-monitor orders resume {scope}")
                if why:
                    message += f" (note: {why})"
            self.audit_append(conn, "order.held", self._audit_body(
                anchor, held_meters=kept, orders=order_ids, cleared_rule=rule), now)
            self._event(conn, anchor, "order.held", "info", message=message, at=now, meters=kept)
            log.info("%s", message)
        return issued

    def _auto_resume(self, conn: sqlite3.Connection, scope: str, meters: Sequence[str],
                     rule: str, now: float) -> Order | None:
        if self._duplicate(conn, "resume", meters, self.dry_run):
            return None
        dry = self.dry_run
        recent = conn.execute(
            "SELECT count(*), min(issued_at) FROM orders WHERE scope = ? AND dry_run = ?"
            " AND issued_at > ? AND state != ?",
            (scope, int(dry), now - RATE_WINDOW_S, REFUSED)).fetchone()
        reason = f"rule {rule} cleared (actions.auto_resume)"
        if int(recent[0]) >= self.cfg.max_orders_per_hour:
            return self._refuse(conn, action="resume", scope=scope, meters=meters, rule=rule,
                                reason=reason, now=now, target_kw=None,
                                reopens_at=float(recent[1]) + RATE_WINDOW_S, data={})
        return self._issue(conn, action="resume", scope=scope, meters=meters, rule=rule,
                           reason=reason, now=now, target_kw=None, actor="daemon", data={})

    def _blocked(self, conn: sqlite3.Connection, rule: str, scope: str,
                 meters: Sequence[str]) -> dict[str, str]:
        """meter -> another rule in breach whose shutdown/limit covers it."""
        rules = {r.id: r for r in self.config.rules}
        wanted = set(meters)
        out: dict[str, str] = {}
        for other, other_scope in conn.execute(
                "SELECT rule, scope FROM alert_state WHERE state = 'breach'"
                " AND NOT (rule = ? AND scope = ?) ORDER BY rule, scope", (rule, scope)):
            cfg = rules.get(str(other))
            if cfg is None or not {"shutdown", "limit"} & set(cfg.on_breach):
                continue
            try:
                covered = self.resolve(str(other_scope), conn)
            except ActionsError:
                continue
            for m in covered:
                if m in wanted:
                    out.setdefault(m, str(other))
        return out

    def resume(self, conn: sqlite3.Connection, scope: str, now: float, actor: str = "operator",
               reason: str = "") -> Order:
        """An operator's resume of every meter of ``scope`` (``energy-monitor orders resume``).

        In the caller's transaction; audited as ``operator.resume`` with the actor.
        Never de-duplicated or rate-limited (it still counts towards the limit).
        The daemon publishes it (:meth:`publish_pending`) if this process cannot.
        """
        self._require_transaction(conn, "resume()")
        text = reason or f"resumed by {actor}"
        blocked = self._blocked(conn, "", "", self.resolve(scope, conn))
        if blocked:
            text += "; overriding rules still in breach: " + ", ".join(
                f"{m} ({r})" for m, r in blocked.items())
        result = self.order(conn, "resume", scope, "", text, now, actor=actor)
        if result is None:  # cannot happen: non-daemon orders are never de-duplicated
            raise ActionsError(f"resume of {scope} was not recorded")
        return result

    # ------------------------------------------------------------------ verification

    def verify(self, conn: sqlite3.Connection, now: float) -> Progress:
        """Check live orders against the meters (in the caller's transaction).

        * ``pending`` off orders: confirmed when every meter they hold reports
          ``power_w < confirm_below_w`` in a reading after the issue time; past the
          deadline re-sent (``resends + 1``, new deadline) up to ``max_resends``,
          then ``failed`` with a critical ``order.failed``.
        * ``failed`` off orders still in force: confirmed late if the meters fall quiet.
        * ``confirmed`` off orders still in force: a meter that draws
          ``>= confirm_below_w`` again (a reading after the confirmation) raises one
          critical ``alert.firing`` per meter and order.
        * ``sent`` resumes: confirmed when every meter they hold draws ``>=
          confirm_below_w`` after the issue time (no deadline, never failed).
        * ``pending``/``sent`` orders that hold no meter any more: ``superseded``.
        """
        self._require_transaction(conn, "verify()")
        progress = Progress()
        if self.dry_run:
            return progress
        owners = self.owners(conn, dry_run=False)
        power = self.power(conn)
        rows = conn.execute(
            f"SELECT {_COLS} FROM orders WHERE dry_run = 0 AND (state IN (?, ?) OR order_id IN"
            " (SELECT order_id FROM order_meters WHERE dry_run = 0))"
            " ORDER BY issued_at, order_id", (PENDING, SENT)).fetchall()
        for row in rows:
            o = _order(row)
            keys = o.meters or (NO_METER,)
            mine = [m for m in keys if owners.get(m) == o.order_id]
            if not mine:
                if o.state in (PENDING, SENT):
                    self._set(conn, o, now, state=SUPERSEDED, publish_due=None)
                    self.audit_append(conn, "order.superseded", self._audit_body(o), now)
                    progress.superseded.append(o.order_id)
                    self._count(o.action, "superseded")
                continue
            if not o.meters:
                continue  # nothing to measure: an order for a site whose meters are unknown
            if o.off and o.state in (PENDING, FAILED):
                self._check_off(conn, o, mine, power=power, now=now, progress=progress)
            elif o.off and o.state == CONFIRMED:
                self._watch(conn, o, mine, power=power, now=now, progress=progress)
            elif o.action == "resume" and o.state == SENT:
                self._check_on(conn, o, mine, power=power, now=now, progress=progress)
        return progress

    def _check_off(self, conn: sqlite3.Connection, o: Order, mine: Sequence[str], *,
                   power: Mapping[str, MeterPower], now: float, progress: Progress) -> None:
        below = self.cfg.confirm_below_w
        problems: list[str] = []
        for m in mine:
            p = power.get(m)
            if p is None or p.last_seen is None or p.last_seen <= o.issued_at:
                problems.append(f"{m}: no reading since the order")
            elif p.power_w is None:
                problems.append(f"{m}: power unknown")
            elif p.power_w >= below:
                problems.append(f"{m} draws {p.power_w:.0f} W")
        if not problems:
            late = o.state == FAILED
            self._set(conn, o, now, state=CONFIRMED, publish_due=None,
                      data={**o.data, "confirmed_at": now, **({"late": True} if late else {})})
            self.audit_append(conn, "order.confirmed", self._audit_body(
                o, state=CONFIRMED, meters_confirmed=list(mine), late=late), now)
            after = now - o.issued_at
            message = (f"{o.action} of {o.scope} confirmed: {len(mine)} meter(s) below "
                       f"{below:g} W, {after:.0f} s after the order")
            if late:
                message += " (late: it had been reported failed)"
            self._event(conn, o, "order.confirmed", "info", message=message, at=now, meters=mine)
            log.info("order %s: %s", o.order_id, message)
            progress.confirmed.append(o.order_id)
            self._count(o.action, "confirmed")
            return
        if o.state == FAILED:
            return
        deadline = o.deadline if o.deadline is not None else o.issued_at + self.cfg.confirm_within_s
        if now < deadline:
            return
        if o.resends < self.cfg.max_resends:
            resends = o.resends + 1
            self._set(conn, o, now, resends=resends, deadline=now + self.cfg.confirm_within_s,
                      publish_due=now)
            self.audit_append(conn, "order.resent", self._audit_body(
                o, resends=resends, meters_resent=list(mine), problems=problems), now)
            log.warning("order %s (%s of %s) not confirmed, re-sending (%d of %d): %s",
                        o.order_id, o.action, o.scope, resends, self.cfg.max_resends,
                        "; ".join(problems))
            progress.resent.append(o.order_id)
            self._count(o.action, "resent")
            return
        self._set(conn, o, now, state=FAILED)
        self.audit_append(conn, "order.failed", self._audit_body(
            o, state=FAILED, problems=problems), now)
        unsent = " It was never acknowledged by the broker." if o.published_at is None else ""
        message = (f"{o.action} of {o.scope} NOT confirmed {now - o.issued_at:.0f} s after the "
                   f"order and {o.resends} re-send(s): {'; '.join(problems[:10])}"
                   f"{' ...' if len(problems) > 10 else ''}. Switch these loads off by hand."
                   f"{unsent}")
        self._event(conn, o, "order.failed", "critical", message=message, at=now, meters=mine)
        log.error("order %s: %s", o.order_id, message)
        progress.failed.append(o.order_id)
        self._count(o.action, "failed")

    def _watch(self, conn: sqlite3.Connection, o: Order, mine: Sequence[str], *,
               power: Mapping[str, MeterPower], now: float, progress: Progress) -> None:
        below = self.cfg.confirm_below_w
        since = float(o.data.get("confirmed_at", o.updated_at))
        reported = list(o.data.get("violations", []))
        fresh: list[tuple[str, float]] = []
        for m in mine:
            p = power.get(m)
            if (m not in reported and p is not None and p.power_w is not None
                    and p.power_w >= below and p.last_seen is not None and p.last_seen > since):
                fresh.append((m, p.power_w))
        if not fresh:
            return
        reported += [m for m, _ in fresh]
        self._set(conn, o, now, data={**o.data, "violations": reported})
        for m, watts in fresh:
            what = ("shutdown" if o.action == "shutdown"
                    else f"switch-off (limit of {o.scope} to {o.target_kw:g} kW)")
            message = (f"meter {m} draws {watts:.0f} W after confirmed {what} "
                       f"(order {o.order_id}, {o.scope}, rule {o.rule or o.actor})")
            self.audit_append(conn, "order.violation", self._audit_body(
                o, meter=m, power_w=watts), now)
            self._event(conn, o, "alert.firing", "critical", message=message, at=now, meters=[m])
            log.error("%s", message)
            progress.violations.append((o.order_id, m))

    def _check_on(self, conn: sqlite3.Connection, o: Order, mine: Sequence[str], *,
                  power: Mapping[str, MeterPower], now: float, progress: Progress) -> None:
        above = self.cfg.confirm_below_w
        for m in mine:
            p = power.get(m)
            if (p is None or p.power_w is None or p.last_seen is None
                    or p.last_seen <= o.issued_at or p.power_w < above):
                return
        self._set(conn, o, now, state=CONFIRMED, data={**o.data, "confirmed_at": now})
        self.audit_append(conn, "order.confirmed", self._audit_body(
            o, state=CONFIRMED, meters_confirmed=list(mine)), now)
        message = (f"resume of {o.scope} confirmed: {len(mine)} meter(s) draw at least "
                   f"{above:g} W again, {now - o.issued_at:.0f} s after the order")
        self._event(conn, o, "order.confirmed", "info", message=message, at=now, meters=mine)
        progress.confirmed.append(o.order_id)
        self._count(o.action, "confirmed")

    def _set(self, conn: sqlite3.Connection, o: Order, now: float, *, state: str | None = None,
             resends: int | None = None, deadline: float | None = None,
             publish_due: Any = _UNSET, data: Mapping[str, Any] | None = None) -> None:
        sets: list[str] = ["updated_at = ?"]
        args: list[Any] = [now]
        if state is not None:
            sets.append("state = ?")
            args.append(state)
        if resends is not None:
            sets.append("resends = ?")
            args.append(resends)
        if deadline is not None:
            sets.append("deadline = ?")
            args.append(deadline)
        if publish_due is not _UNSET:
            sets.append("publish_due = ?")
            args.append(publish_due)
        if data is not None:
            sets.append("data = ?")
            args.append(_dumps(dict(data)))
        conn.execute(f"UPDATE orders SET {', '.join(sets)} WHERE order_id = ?",
                     (*args, o.order_id))

    # ------------------------------------------------------------------ publication

    def messages(self, o: Order, meters: Sequence[str]) -> list[tuple[str, str]]:
        """The MQTT messages of one (re-)publication: the SPEC order JSON on the site's
        orders topic, then each held meter's device command."""
        out = [(self.topic, _dumps(o.payload(meters, attempt=o.resends + 1)))]
        for m in meters:
            mc = self._meters.get(m)
            if mc is not None and mc.control is not None:
                out.append(device_command(mc.control, m, not o.off, o.order_id))
        return out

    def publish_pending(self, conn: sqlite3.Connection, now: float | None = None) -> int:
        """Publish every live order whose publication is due; returns how many went out.

        Must run outside any transaction (only committed orders are published).
        An order is marked published only when the broker acknowledged all its
        messages; otherwise it is tried again ``retry_s`` later.  Publishes nothing
        in dry-run mode, without a ``publish`` callable, or while ``connected()``
        says the link is down.  Serialised across threads.
        """
        if conn.in_transaction:
            raise ActionsError("publish_pending() must run after the commit, outside a transaction")
        if self.dry_run or self.publish is None:
            return 0
        if self.connected is not None and not self.connected():
            return 0
        sent = 0
        with self._publish_lock:
            t = self.clock() if now is None else now
            rows = conn.execute(
                f"SELECT {_COLS} FROM orders WHERE publish_due IS NOT NULL AND publish_due <= ?"
                " AND dry_run = 0 ORDER BY issued_at, order_id", (t,)).fetchall()
            if not rows:
                return 0
            owners = self.owners(conn, dry_run=False)
            for row in rows:
                o = _order(row)
                mine = [m for m in o.meters if owners.get(m) == o.order_id]
                held = bool(mine) or (not o.meters and owners.get(NO_METER) == o.order_id)
                if not held:
                    # a later order took all its meters: publishing it now would undo that
                    self._mark_published(conn, o, t, published=False)
                    continue
                if self._send(self.messages(o, mine)):
                    self._mark_published(conn, o, self.clock() if now is None else now)
                    sent += 1
                else:
                    conn.execute("UPDATE orders SET publish_due = ? WHERE order_id = ?"
                                 " AND publish_due = ?", (t + self.retry_s, o.order_id,
                                                          o.publish_due))
        return sent

    def _mark_published(self, conn: sqlite3.Connection, o: Order, at: float,
                        published: bool = True) -> None:
        # compare-and-set: a re-send scheduled meanwhile keeps its own publish_due
        if published:
            conn.execute("UPDATE orders SET publish_due = NULL, published_at = ? WHERE"
                         " order_id = ? AND publish_due = ?", (at, o.order_id, o.publish_due))
        else:
            conn.execute("UPDATE orders SET publish_due = NULL WHERE order_id = ?"
                         " AND publish_due = ?", (o.order_id, o.publish_due))

    def _send(self, messages: Sequence[tuple[str, str]]) -> bool:
        assert self.publish is not None
        infos: list[object] = []
        for topic, payload in messages:
            try:
                infos.append(self.publish(topic, payload, 1, False))
            except (MqttError, OSError, RuntimeError, ValueError) as exc:
                log.warning("publishing to %s failed (%s); retrying in %.0f s", topic, exc,
                            self.retry_s)
                return False
        until = time.monotonic() + self.ack_timeout_s
        for info in infos:
            wait = getattr(info, "wait_for_publish", None)
            if not callable(wait):
                continue
            try:
                wait(max(0.0, until - time.monotonic()))
            except (RuntimeError, ValueError) as exc:  # paho: not queued (no connection)
                log.warning("order message not acknowledged (%s); retrying in %.0f s", exc,
                            self.retry_s)
                return False
            done = getattr(info, "is_published", None)
            if callable(done) and not done():
                log.warning("broker did not acknowledge an order message within %.0f s; "
                            "retrying in %.0f s", self.ack_timeout_s, self.retry_s)
                return False
        return True

    # ------------------------------------------------------------------ jobs, queries

    def tick(self, conn: sqlite3.Connection, now: float | None = None) -> Progress:
        """The scheduler job (every few seconds): :meth:`verify` in one transaction, then
        :meth:`publish_pending` (also picks up orders other processes recorded)."""
        t = self.clock() if now is None else now
        with transaction(conn):
            progress = self.verify(conn, t)
        self.publish_pending(conn, now)
        return progress

    @staticmethod
    def get(conn: sqlite3.Connection, order_id: str) -> Order | None:
        row = conn.execute(f"SELECT {_COLS} FROM orders WHERE order_id = ?",
                           (order_id,)).fetchone()
        return None if row is None else _order(row)

    @staticmethod
    def list_orders(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` orders, newest first (``energy-monitor orders list``)."""
        rows = conn.execute(f"SELECT {_COLS} FROM orders ORDER BY issued_at DESC, order_id DESC"
                            " LIMIT ?", (max(0, limit),)).fetchall()
        return [_order(r).as_dict() for r in rows]

    @staticmethod
    def _require_transaction(conn: sqlite3.Connection, what: str) -> None:
        if not conn.in_transaction:
            raise ActionsError(f"{what} must run inside the caller's transaction "
                               "(BEGIN IMMEDIATE ... COMMIT), so the order, its audit entry "
                               "and its events commit together")
