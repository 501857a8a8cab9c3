"""The site status (SPEC ``status --json`` and ``GET /api/status``), read from the store.

Works whether or not the daemon runs: it only reads SQLite (WAL readers do
not block the writer).
"""

from __future__ import annotations

import json
from typing import Any

from monitor.config import Config
from monitor.core.periods import period_of
from monitor.core.timefmt import rfc3339_or_none as _iso
from monitor.store.ledger import Store


def month_bounds(now: float, config: Config) -> tuple[str, str, str]:
    """(first day, last day, label) of the current calendar month in the site's zone."""
    p = period_of("calendar_month", now, config.site.tz)
    return p.first_day.isoformat(), p.last_day.isoformat(), p.label


def _month_start(now: float, config: Config) -> float:
    return period_of("calendar_month", now, config.site.tz).start_ts


def build(store: Store, config: Config, now: float) -> dict[str, Any]:
    """The status document.  ``now`` is injected so the output is reproducible."""
    first, last, label = month_bounds(now, config)
    totals = store.daily_totals(first, last)
    configured = {m.id: m for m in config.meters}
    default_interval = config.intake.expected_interval_s
    meters: list[dict[str, Any]] = []
    power_total = 0.0
    for row in store.meters():
        mc = configured.get(row.id)
        interval = (mc.expected_interval_s if mc and mc.expected_interval_s
                    else default_interval)
        if not row.online:
            state = "offline"
        elif row.last_seen is None or now - row.last_seen > 2 * interval:
            state = "stale"
        else:
            state = "ok"
        power = row.power_w if state == "ok" else None
        power_total += power or 0.0
        meters.append({
            "id": row.id,
            "group": row.group,
            "format": row.format,
            "last_seen": _iso(row.last_seen),
            "power_w": power,
            "period_kwh": round(totals.get(row.id, (0.0, 0.0))[0], 6),
            "state": state,
        })
    rules = []
    for rule, scope, state, data in store.conn.execute(
        "SELECT rule, scope, state, data FROM alert_state ORDER BY rule, scope"
    ):
        d = json.loads(data or "{}")
        rules.append({"id": rule, "scope": scope, "state": state, "value": d.get("value"),
                      "limit": d.get("limit"), "unit": d.get("unit"),
                      "projected": d.get("projected")})
    return {
        "site": config.site.id,
        "period": label,
        "now": _iso(now),
        "totals": {
            "period_kwh": round(sum(v[0] for v in totals.values()), 6),
            "power_w": round(power_total, 3),
        },
        "meters": meters,
        "rules": rules,
        "dead_letters": store.counts()["dead_letters"],
        # ledger anomalies of the month by kind (counter_backwards, meter_replaced,
        # quarantine, clock_ahead, ...) and what the intake ignored or skipped, by reason
        "anomalies": store.anomaly_counts(_month_start(now, config)),
        "intake": store.outcomes(),
    }
