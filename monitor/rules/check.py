"""The scheduled rule check: store -> snapshot -> verdicts -> alert states -> events/orders.

Called from one scheduler job (never concurrently with itself).  Everything a
check decides -- new alert states, events, audit entries, export lines and
orders -- is written in ONE transaction, so a crash either keeps all of it or
none (and the next check decides again: no event is lost or doubled).  Orders
are published only after that commit (:meth:`Actions.publish_pending`).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from monitor.config import Config
from monitor.core.periods import period_bounds
from monitor.core.signal import Signal
from monitor.core.verdict import Verdict
from monitor.metrics import Metrics
from monitor.outputs import exporter
from monitor.outputs.events import emit
from monitor.outputs.lineproto import rule_line
from monitor.rules import alerts
from monitor.rules import evaluate as rules
from monitor.rules.alerts import AlertState, AlertStore
from monitor.store import audit, kv
from monitor.store.ledger import Store

log = logging.getLogger(__name__)

STATE_INT = {"ok": 0, "warning": 1, "breach": 2}
MAX_UNKNOWN_EVENTS = 20  # meter.unknown events per check
LAST_CHECK_KEY = "check.last"  # kv: the time of the last completed check


class OrderSink(Protocol):
    """What the check needs from the actions layer (:class:`monitor.act.orders.Actions`)."""

    def apply(self, conn: sqlite3.Connection, verdict: Verdict, actions: Iterable[str],
              breach_cleared: bool, now: float) -> Sequence[object]: ...

    def publish_pending(self, conn: sqlite3.Connection, now: float | None = None) -> int: ...


@dataclass
class CheckResult:
    verdicts: list[Verdict] = field(default_factory=list)
    events: int = 0
    orders: int = 0


def build_snapshot(store: Store, config: Config, now: float,
                   watching_since: float | None = None) -> rules.Snapshot:
    """Read what the configured rules need from the store, as of ``now``.

    ``watching_since`` (the daemon's start) stands in for the last reading of a
    meter that has never reported: it is silent since we started listening,
    not since the beginning of time, so a fresh install does not report every
    configured meter stale at its first check.
    """
    tz = config.site.tz
    with store.reading():  # one committed state for every total below
        meters, reported = _meters(store, config, now, watching_since)
        period_kwh: dict[str, dict[str, float]] = {}
        period_gap: dict[str, dict[str, float]] = {}
        today = dt.datetime.fromtimestamp(now, tz).date().isoformat()
        for period in sorted(rules.periods_needed(config.rules)):
            start, _end, _label = period_bounds(period, now, tz)
            first = dt.datetime.fromtimestamp(start, tz).date().isoformat()
            # whole local days, months or years, each from its own rollup
            if period == "calendar_day":
                kwh, gap = store.period_totals("day", first, today)
            elif period == "calendar_year":
                kwh, gap = store.period_totals("year", first[:4], today[:4])
            else:
                kwh, gap = store.period_totals("month", first[:7], today[:7])
            period_kwh[period], period_gap[period] = kwh, gap
        windows = store.window_energy(rules.windows_needed(config.rules), now)
        signals = {
            topic: Signal(target_kw=kw if kw is not None else 0.0,
                          until=until if until is not None else 0.0, received_at=at)
            for topic, kw, until, at in store.conn.execute(
                "SELECT topic, target_kw, until, received_at FROM signals")
        }
    covered = {w: _covered(kwh, w, now, reported, meters) for w, kwh in windows.items()}
    return rules.Snapshot(now=now, site=config.site, meters=meters, period_kwh=period_kwh,
                          period_gap_kwh=period_gap, window_kwh=windows, signals=signals,
                          window_covered_s=covered)


def _meters(store: Store, config: Config, now: float, watching_since: float | None
            ) -> tuple[dict[str, rules.MeterSnapshot], dict[str, float]]:
    """Every meter as the rules see it, and the last reading of the fresh ones
    (reported within twice their interval): their accounted data spans from their
    ``first_seen`` (or that last reading) to it.  (Floats, not span tuples: a dict of
    floats is not tracked by the garbage collector, 10,000 tuples per check are.)"""
    per_meter = _meter_settings(config)
    patterns = bool(config.meter_patterns)
    default = (None, config.intake.expected_interval_s)
    meters: dict[str, rules.MeterSnapshot] = {}
    reported: dict[str, float] = {}
    snapshot = rules.meter_snapshot
    for mid, device, stored_group, first_seen, last_seen, power_w, online in \
            store.meter_states():
        got = per_meter.get(mid)
        if got is None:
            mc = config.meter_config(mid, device) if patterns else None
            if mc is not None:
                got = (mc.group, mc.rated_kw, mc.expected_interval_s or default[1])
        if got is not None:
            group, rated, interval = got
        else:
            group, (rated, interval) = stored_group, default
        fresh = online and last_seen is not None and now - last_seen <= 2 * interval
        if fresh and last_seen is not None:
            reported[mid] = last_seen
        meters[mid] = snapshot(
            mid, group, rated, last_seen if last_seen is not None else watching_since,
            bool(online), power_w if fresh else None, interval,
            first_seen if last_seen is not None else None)
    return meters, reported


#: the configuration the settings below were taken from, and its meters' settings
_settings: tuple[Config, dict[str, tuple[str, float | None, float]]] | None = None


def _meter_settings(config: Config) -> dict[str, tuple[str, float | None, float]]:
    """``id -> (group, rated_kw, expected interval)`` of every ``[[meters]]`` entry:
    they depend on the configuration only, so they are taken once per configuration
    object, not once per check."""
    global _settings
    kept = _settings
    if kept is not None and kept[0] is config:
        return kept[1]
    default = config.intake.expected_interval_s
    got = {m.id: (m.group, m.rated_kw, m.expected_interval_s or default) for m in config.meters}
    _settings = (config, got)
    return got


def _covered(kwh: dict[str, float], window_s: float, now: float,
             reported: dict[str, float],
             meters: dict[str, rules.MeterSnapshot]) -> dict[str, float]:
    """The seconds of ``[now - window_s, now]`` each meter's window energy covers.

    A meter's energy is accounted up to its last reading, so the last reporting
    interval of a window has no reading yet (a Tasmota at its default 300 s
    TelePeriod would read up to a third low over a 900 s window), and a meter
    first seen inside the window has data only since then (two minutes of a
    new rig are two minutes, not an hour).  A fresh meter (reported within
    twice its interval) covers from ``max(window start, first reading)`` to its
    last reading.  A silent or offline meter is never carried forward: it
    covers from ``max(window start, first reading)`` to ``now``, its silence
    counted as time observed with nothing used.  The rules divide by this
    (:meth:`monitor.rules.evaluate.ScopeIndex.rate_kw`).
    """
    start = now - window_s
    out: dict[str, float] = {}
    last_of, meter_of = reported.get, meters.get
    for meter in kwh:  # max() spelt out: this runs for every meter and window
        last = last_of(meter)
        m = meter_of(meter)
        first = m.first_seen if m is not None else None
        if last is not None and start < last <= now:
            lo = first if first else last  # its data starts at its first reading
            d = last - (lo if lo > start else start)
        elif first is None:
            out[meter] = window_s
            continue
        else:
            d = now - (first if first > start else start)
        out[meter] = d if d > 0.0 else 0.0
    return out


class Checker:
    """Runs one check per call of :meth:`run`.  Owned by the scheduler's check job."""

    def __init__(self, config: Config, metrics: Metrics, actions: OrderSink | None,
                 started_at: float | None = None) -> None:
        self.config = config
        self.started_at = started_at
        self.metrics = metrics
        self.actions = actions
        self.rules_by_id = {r.id: r for r in config.rules}
        self._first_run = True

    def run(self, store: Store, now: float) -> CheckResult:
        snap = build_snapshot(store, self.config, now, self.started_at)
        verdicts = rules.evaluate_all(self.config.rules, snap)
        res = CheckResult(verdicts=verdicts)
        site = self.config.site.id
        with store.transaction() as conn:
            states = AlertStore(conn)
            known = states.load_all()
            for v in verdicts:
                rule = self.rules_by_id[v.rule]
                prev = known.get((v.rule, v.scope))
                new, drafts = alerts.step(prev, v, now, rule)
                if new != prev:
                    states.save(new)
                if prev is None or new.state != prev.state:
                    audit.append(conn, "rule.transition", _transition(v, prev, new), now)
                exporter.enqueue(conn, [rule_line(
                    site, v.rule, v.scope, v.value, v.limit, v.ratio, v.projected,
                    STATE_INT[v.state], now)])
                for d in drafts:
                    emit(conn, self.config, d.body(site=site, event_id=str(uuid.uuid4())), now,
                         deliver="alert" in d.actions)
                    res.events += 1
                res.orders += self._act(conn, v, drafts, now)
                if self._first_run and prev is not None and not drafts:
                    res.orders += self._enforce_standing_breach(conn, v, prev, now)
                self.metrics.rule_state.labels(v.rule, v.scope).set(STATE_INT[v.state])
                if v.ratio is not None:
                    self.metrics.rule_ratio.labels(v.rule, v.scope).set(v.ratio)
            res.events += self._unknown_meters(conn, now)
            kv.put(conn, LAST_CHECK_KEY, repr(now))  # `status` shows "as of" this
            # a rule removed from the config (or no longer matching the site) leaves
            # no stale state behind in `status`
            current = {(v.rule, v.scope) for v in verdicts}
            for key in set(known) - current:
                states.delete(*key)
        self._first_run = False
        if self.actions is not None and res.orders:
            self.actions.publish_pending(store.conn)
        return res

    def _unknown_meters(self, conn: sqlite3.Connection, now: float) -> int:
        """``meter.unknown`` once per device that reported but no ``[[meters]]`` entry names.

        Such a meter is read (``intake.allow_unconfigured``) but sits outside every
        group cap and has no control topic, so a new rig must be noticed.  At most
        ``MAX_UNKNOWN_EVENTS`` per check; the rest are noticed by the next checks."""
        configured = [m.id for m in self.config.meters]
        marks = ",".join("?" * len(configured))
        patterns = bool(self.config.meter_patterns)
        rows = conn.execute(
            "SELECT id, device, format, first_seen FROM meters WHERE first_seen IS NOT NULL"
            f"{f' AND id NOT IN ({marks})' if configured else ''}"
            " AND id NOT IN (SELECT meter FROM meter_notices WHERE kind = 'meter.unknown')"
            f" ORDER BY first_seen, id{'' if patterns else ' LIMIT ?'}",
            (*configured, *(() if patterns else (MAX_UNKNOWN_EVENTS + 1,)))).fetchall()
        if patterns:  # meters a [[meter_patterns]] entry configures are known
            rows = [r for r in rows
                    if self.config.meter_config(str(r[0]), str(r[1])) is None]
        if not rows:
            return 0
        shown = rows[:MAX_UNKNOWN_EVENTS]
        deliver = self.config.intake.allow_unconfigured
        for mid, device, fmt, first in shown:
            msg = (f"unknown device {device} ({fmt}) is reporting as meter {mid}, outside "
                   "every group and without a control topic: add it to [[meters]]")
            emit(conn, self.config, {
                "kind": "meter.unknown", "severity": "warning", "rule": "",
                "scope": f"meter:{mid}", "message": msg, "value": None, "limit": None,
                "unit": "", "period": "", "projected": None, "first_seen": first}, now,
                deliver=deliver)
        conn.executemany("INSERT OR IGNORE INTO meter_notices (meter, kind, at)"
                         " VALUES (?, 'meter.unknown', ?)", [(r[0], now) for r in shown])
        return len(shown)

    def _act(self, conn: sqlite3.Connection, v: Verdict,
             drafts: Sequence[alerts.EventDraft], now: float) -> int:
        if self.actions is None or not drafts:
            return 0
        # on_warn or on_breach, whichever the transition fired; reminders carry only alert
        wanted, cleared = alerts.on_actions(drafts)
        if not cleared and not set(wanted) & {"shutdown", "limit"}:
            return 0
        return len(self.actions.apply(conn, v, wanted, cleared, now))


    def _enforce_standing_breach(self, conn: sqlite3.Connection, v: Verdict,
                                 prev: AlertState, now: float) -> int:
        """At the first check after a start in live mode: a breach that began earlier
        (in dry run, or before a crash) and was never acted on live gets its
        ``on_breach`` orders now.  Without this, switching a commissioned site from
        ``dry_run`` to ``live`` in the middle of a ban would never stop the load,
        because orders fire only when a rule *enters* breach.  A breach that was
        acted on live (even if an operator resumed since) is left alone."""
        if self.actions is None or self.config.actions.mode != "live":
            return 0
        rule = self.rules_by_id[v.rule]
        wanted = [a for a in rule.on_breach if a in ("shutdown", "limit")]
        if v.state != "breach" or prev.state != "breach" or not wanted:
            return 0
        acted = conn.execute(
            "SELECT 1 FROM orders WHERE rule = ? AND scope = ? AND dry_run = 0"
            " AND action IN ('shutdown', 'limit') AND issued_at >= ? LIMIT 1",
            (v.rule, v.scope, prev.since or 0.0)).fetchone()
        if acted:
            return 0
        log.warning("rule %s on %s has been in breach since %s without a live order: "
                    "ordering %s now", v.rule, v.scope, prev.since, "/".join(wanted))
        return len(self.actions.apply(conn, v, wanted, False, now))


def _transition(v: Verdict, prev: AlertState | None, new: AlertState) -> dict[str, Any]:
    return {"rule": v.rule, "scope": v.scope, "from": prev.state if prev else None,
            "to": new.state, "value": v.value, "limit": v.limit, "unit": v.unit,
            "period": v.period, "message": v.message}
