"""The site status (SPEC ``status --json`` and ``GET /api/status``), read from the store.

Works whether or not the daemon runs: it only reads SQLite through a read-only
connection (WAL readers do not block the writer).  The same document feeds the
operator's page (:mod:`monitor.app.http`), so everything the page shows is here:
the SPEC keys (``site``, ``period``, ``now``, ``totals``, ``meters``, ``rules``)
and, added to them, the site's zone, "as of" times, per-group totals, the off
orders in force and how to resume them, the last events and the problems.

Cost: a fixed number of queries, each one row per meter at most (the meters
table, the month's rollup, the orders in force), so 10,000 meters cost a few
tens of milliseconds; nothing reads raw readings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from monitor.act import repo as orders_repo
from monitor.config import Config
from monitor.core.periods import period_of
from monitor.core.timefmt import local_iso
from monitor.core.timefmt import rfc3339_or_none as _iso
from monitor.store.ledger import Store

#: the kv key the check job writes at the end of every check (monitor.rules.check)
LAST_CHECK_KEY = "check.last"
#: how many events and dead letters the document carries
RECENT_EVENTS = 20
RECENT_DEAD_LETTERS = 5
#: how many meter ids an order lists in the document (it also carries the count)
ORDER_METERS_LISTED = 20
_OFF_IN_FORCE = ("pending", "confirmed", "failed", "dry_run")


def month_bounds(now: float, config: Config) -> tuple[str, str, str]:
    """(first day, last day, label) of the current calendar month in the site's zone."""
    p = period_of("calendar_month", now, config.site.tz)
    return p.first_day.isoformat(), p.last_day.isoformat(), p.label


def _month_start(now: float, config: Config) -> float:
    return period_of("calendar_month", now, config.site.tz).start_ts


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def build(store: Store, config: Config, now: float,
          health: Sequence[str] | None = None) -> dict[str, Any]:
    """The status document.  ``now`` is injected so the output is reproducible.

    ``health``: the daemon's health reasons (``[]`` healthy) when the daemon builds
    it; ``None`` (``status`` from the CLI) when nobody in this process knows.
    """
    _first, _last, label = month_bounds(now, config)
    # the monthly rollup holds one row per meter for the month (the same whole mWh
    # as the days, kept in the same transaction)
    totals = store.monthly_totals(label, label)
    configured = {m.id: m for m in config.meters}
    patterns = bool(getattr(config, "meter_patterns", None))
    default_interval = config.intake.expected_interval_s
    meters: list[dict[str, Any]] = []
    stale: list[str] = []
    offline: list[str] = []
    unknown: list[str] = []
    groups: dict[str, dict[str, Any]] = {}
    power_total = 0.0
    last_reading: float | None = None
    for row in store.meters():
        mc = configured.get(row.id)
        if mc is None and patterns:
            mc = config.meter_config(row.id, row.device)
        interval = (mc.expected_interval_s if mc and mc.expected_interval_s
                    else default_interval)
        if not row.online:
            state = "offline"
        elif row.last_seen is None or now - row.last_seen > 2 * interval:
            state = "stale"
        else:
            state = "ok"
        is_unknown = mc is None and row.first_seen is not None
        power = row.power_w if state == "ok" else None
        power_total += power or 0.0
        kwh = round(totals.get(row.id, (0.0, 0.0))[0], 6)
        group = mc.group if mc else row.group
        if row.last_seen is not None and (last_reading is None or row.last_seen > last_reading):
            last_reading = row.last_seen
        meters.append({
            "id": row.id,
            "group": group,
            "format": row.format,
            "last_seen": _iso(row.last_seen),
            "power_w": power,
            "period_kwh": kwh,
            "state": state,
            "configured": mc is not None,
        })
        if state == "stale":
            stale.append(row.id)
        elif state == "offline":
            offline.append(row.id)
        if is_unknown:
            unknown.append(row.id)
        g = groups.get(group)
        if g is None:
            g = groups[group] = {"group": group, "meters": 0, "ok": 0, "stale": 0,
                                 "offline": 0, "unknown": 0, "power_w": 0.0, "period_kwh": 0.0}
        g["meters"] += 1
        g[state] += 1
        g["unknown"] += int(is_unknown)
        g["power_w"] += power or 0.0
        g["period_kwh"] += kwh
    for g in groups.values():
        g["power_w"] = round(g["power_w"], 3)
        g["period_kwh"] = round(g["period_kwh"], 6)
    rules = _rules(store, config)
    raw_check = store.kv_get(LAST_CHECK_KEY)
    counts = store.counts()
    return {
        "site": config.site.id,
        "site_name": config.site.name,
        "timezone": config.site.timezone,
        "period": label,
        "now": _iso(now),
        "now_local": local_iso(now, config.site.tz),
        "as_of": {"checked_at": _iso(float(raw_check)) if raw_check else None,
                  "last_reading": _iso(last_reading)},
        "mode": config.actions.mode,
        "totals": {
            "period_kwh": round(sum(v[0] for v in totals.values()), 6),
            "power_w": round(power_total, 3),
        },
        "meters": meters,
        "groups": sorted(groups.values(), key=lambda g: str(g["group"])),
        "rules": rules,
        "orders": _orders(store, config, rules),
        "events": _events(store),
        "problems": {
            "stale": stale,
            "offline": offline,
            "unknown": unknown,
            "dead_letters": {"count": counts["dead_letters"],
                             "recent": [{"at": _iso(at), "topic": topic, "reason": reason}
                                        for at, topic, reason in
                                        store.recent_dead_letters(RECENT_DEAD_LETTERS)]},
            "health": None if health is None else list(health),
        },
        "dead_letters": counts["dead_letters"],
        # ledger anomalies of the month by kind (counter_backwards, meter_replaced,
        # quarantine, clock_ahead, ...) and what the intake ignored or skipped, by reason
        "anomalies": store.anomaly_counts(_month_start(now, config)),
        "intake": store.outcomes(),
    }


def _rules(store: Store, config: Config) -> list[dict[str, Any]]:
    kinds = {r.id: r.kind for r in config.rules}
    out = []
    for rule, scope, state, since, data in store.conn.execute(
        "SELECT rule, scope, state, since, data FROM alert_state ORDER BY rule, scope"
    ):
        d: Mapping[str, Any] = json.loads(data or "{}")
        limit_at = _finite(d.get("limit_at"))
        out.append({"id": rule, "scope": scope, "state": state, "value": d.get("value"),
                    "limit": d.get("limit"), "unit": d.get("unit"),
                    "projected": d.get("projected"),
                    "kind": kinds.get(rule, ""),
                    "ratio": d.get("ratio"),
                    "seconds_to_limit": d.get("seconds_to_limit"),
                    "limit_at": _iso(limit_at),
                    "warming_up": bool(d.get("warming_up", False)),
                    "message": d.get("message", ""),
                    "since": _iso(_finite(since))})
    return out


def _orders(store: Store, config: Config, rules: Sequence[Mapping[str, Any]]
            ) -> dict[str, list[dict[str, Any]]]:
    """The off orders in force in the current mode: ``active`` while their rule is in
    breach, ``held`` once it is not (loads stay off until an operator resumes them)."""
    dry = config.actions.mode == "dry_run"
    held_meters: dict[str, list[str]] = {}
    for meter, order_id in orders_repo.owners(store.conn, dry).items():
        held_meters.setdefault(order_id, []).append(meter)
    breach = {(r["id"], r["scope"]) for r in rules if r["state"] == "breach"}
    active: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for order_id, held_ids in held_meters.items():
        o = orders_repo.get(store.conn, order_id)
        if o is None or not o.off or o.state not in _OFF_IN_FORCE:
            continue
        names = sorted(n for n in held_ids if n)
        in_breach = bool(o.rule) and (o.rule, o.scope) in breach
        entry = {
            "order_id": o.order_id, "action": o.action, "scope": o.scope, "rule": o.rule,
            "state": o.state, "issued_at": _iso(o.issued_at), "deadline": _iso(o.deadline),
            "resends": o.resends, "dry_run": o.dry_run, "actor": o.actor,
            "target_kw": o.target_kw, "reason": o.reason,
            "meters_held": len(names), "meters": names[:ORDER_METERS_LISTED],
            "rule_in_breach": in_breach,
            "resume": f"energy-monitor orders resume {o.scope}",
        }
        (active if in_breach else held).append(entry)
    for lst in (active, held):
        lst.sort(key=lambda e: str(e["issued_at"]), reverse=True)
    return {"active": active, "held": held}


def _events(store: Store) -> list[dict[str, Any]]:
    out = []
    for kind, severity, rule, scope, at, body in store.conn.execute(
            "SELECT kind, severity, rule, scope, at, body FROM events ORDER BY id DESC LIMIT ?",
            (RECENT_EVENTS,)):
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        out.append({"kind": kind, "severity": severity, "rule": rule, "scope": scope,
                    "at": _iso(_finite(at)), "message": str(message or "")})
    return out
