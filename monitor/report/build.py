"""The compliance report of one calendar month (SPEC ``energy-monitor report``).

:func:`build_report` reads the local store and returns one JSON-ready dict;
:func:`to_json`, :func:`to_csv` and :func:`to_html` render it.  The build is
pure over the store: the generation time ``now`` is passed in, the clock is
never read, so the same store, configuration and ``now`` give the same report
(and the same digest).

What is counted, and how (see ``docs/report.md`` for the reader's view):

* The month is the calendar month in the site's time zone: from local midnight
  of its first day to local midnight of the first day of the next month.  Its
  length in seconds is the difference of those two instants, so a month with a
  DST change is 743 or 745 hours long.
* Energy is the ``daily`` rollup (accounted kWh per meter per local day) summed
  over the month's local days; it is the same figure ``status`` and the rules
  use.  ``gap_upper_kwh`` is the upper bound of the energy that may have been
  drawn while data were missing (``rated_kw`` x gap duration); the
  conservative total is accounted + that bound.
* Completeness of a meter is the share of the assessed span (the month, or the
  part of it before ``now`` while it is still running) that its data cover:
  from its first reading (or the month's start) to its last reading (or the
  month's end), minus the data gaps recorded in that time.

Only reads: the store is never written by a report.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import html
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from monitor import __version__
from monitor.config import (
    BanWindowRule,
    Config,
    CurtailmentRule,
    EnergyCapRule,
    PowerCapRule,
    ReconcileRule,
    SiteConfig,
    StaleDataRule,
)
from monitor.core.periods import Period, month, parse_month
from monitor.core.timefmt import local_iso, parse_rfc3339, rfc3339_or_none
from monitor.rules.evaluate import AnyRule, ban_spans, in_effect, matches_site
from monitor.store.db import StoreError, snapshot
from monitor.store.ledger import Store, to_kwh

FORMATS = ("json", "csv", "html")
FORMAT_VERSION = 1
BUCKET_S = 900  # the ledger's resolution (monitor.core.accounting.BUCKET_S)
STATES = ("ok", "warning", "breach")
ALERT_KINDS = ("alert.firing", "alert.resolved")
_RANK = {s: i for i, s in enumerate(STATES)}
# Jitter (a counter dropping by less than jitter_kwh) changes nothing and can be
# frequent; it is counted but not listed.
UNLISTED_ANOMALIES = frozenset({"jitter"})
# The day-by-meter table of the HTML page falls back to groups beyond this many meters.
HTML_MAX_METER_COLUMNS = 16


# --------------------------------------------------------------------------- period


# --------------------------------------------------------------------------- small helpers


def _kwh(x: float) -> float:
    return round(x, 6) + 0.0  # + 0.0 turns -0.0 into 0.0


def _share(num: float, den: float) -> float:
    return round(num / den, 6) if den > 0 else 0.0


def _json_obj(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _worst(*states: str | None) -> str:
    known = [s for s in states if s in _RANK]
    return max(known, key=lambda s: _RANK[s]) if known else "ok"


def _event_state(kind: str, severity: str, body: Mapping[str, Any]) -> str:
    """The rule state an alert event announces: resolved -> ok; critical -> breach."""
    if kind == "alert.resolved":
        return "ok"
    state = body.get("state")
    if isinstance(state, str) and state in _RANK:
        return state
    return "breach" if severity in ("critical", "breach", "error") else "warning"


def _event_item(row: Sequence[Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """An event of the report from ``(event_id, kind, severity, rule, scope, at, body)``."""
    event_id, kind, severity, rule, scope, at, _ = row
    return {"event_id": event_id, "kind": kind, "severity": severity, "rule": rule,
            "scope": scope, "at": rfc3339_or_none(at), "period": str(body.get("period") or ""),
            "message": str(body.get("message", "")), "value": _num(body.get("value")),
            "limit": _num(body.get("limit")), "unit": body.get("unit")}


def content_sha256(report: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the report's content: canonical JSON of every key but ``sha256``.

    Canonical JSON: keys sorted, no whitespace, UTF-8, no NaN.  Recompute it from a
    JSON report with ``json.loads`` and this function to check the report was not
    edited.
    """
    body = {k: v for k, v in report.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- meters


@dataclass(slots=True)
class _Meter:
    id: str
    device: str
    group: str
    rated_kw: float | None
    configured: bool
    first_seen: float | None
    last_seen: float | None


def _meters(store: Store, config: Config, pb: Period,
            with_data: set[str]) -> dict[str, _Meter]:
    """Meters the report covers: every configured meter, and every stored meter that
    existed before the month ended or has data in it."""
    configured = {m.id: m for m in config.meters}
    out: dict[str, _Meter] = {}
    for row in store.meters():
        mc = configured.get(row.id)
        if mc is None and row.id not in with_data and (
                row.first_seen is None or row.first_seen >= pb.end_ts):
            continue  # appeared after the month (or never reported): not part of it
        out[row.id] = _Meter(
            row.id, row.device, mc.group if mc else row.group,
            mc.rated_kw if mc else None, mc is not None, row.first_seen, row.last_seen)
    for mid, mc in configured.items():
        if mid not in out:
            out[mid] = _Meter(mid, ", ".join(mc.devices), mc.group, mc.rated_kw, True,
                              None, None)
    for mid in with_data - out.keys():
        out[mid] = _Meter(mid, "", "", None, False, None, None)
    return dict(sorted(out.items()))


def _scope_meters(scope: str, meters: Mapping[str, _Meter]) -> list[str]:
    kind, _, name = scope.partition(":")
    if kind == "group":
        return [m.id for m in meters.values() if m.group == name]
    if kind == "meter":
        return [name] if name in meters else []
    return list(meters)


# --------------------------------------------------------------------------- rules


def _in_force(rule: AnyRule, site: SiteConfig, pb: Period) -> str:
    """Why ``rule`` does not govern this site in this month ('' when it does).

    The decision is :func:`monitor.rules.evaluate.matches_site` and
    :func:`~monitor.rules.evaluate.in_effect`
    (the daemon's own), so the report never disagrees with what was enforced.
    """
    if not matches_site(rule, site):
        if isinstance(rule, BanWindowRule) and rule.exempt_off_grid and site.off_grid:
            return "exempt: the site is off grid"
        filters = {k: getattr(rule, k) for k in
                   ("categories", "regions", "subregions", "exclude_subregions")
                   if getattr(rule, k)}
        return (f"site (category {site.category!r}, region {site.region!r}, subregion "
                f"{site.subregion!r}) is outside the rule's filters {filters}")
    if not any(in_effect(rule, day) for day in pb.days):
        return (f"not in effect in this period (effective {rule.effective_from or '...'}"
                f" .. {rule.effective_until or '...'})")
    return ""


def _banned_days(rule: BanWindowRule, pb: Period) -> list[str]:
    spans = ban_spans(rule, pb.first_day)
    return [d.isoformat() for d in pb.days if any(s.first <= d <= s.last for s in spans)]


def _label_in_month(label: str, pb: Period) -> bool:
    """A verdict period label (``2026-10``, ``2026-10-31``) that lies in this month."""
    return label == pb.label or label.startswith(pb.label + "-")


def _label_other_month(label: str, pb: Period) -> bool:
    """A month or day label of another month: e.g. the previous month's closing
    ``alert.resolved``, written at the first check of this month."""
    return bool(re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", label)) and not _label_in_month(label, pb)


def _label_covers(label: str, day: dt.date) -> bool:
    """Whether a verdict period label still holds on ``day``.  Calendar labels
    (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``) end with their period; any other label
    (a ban window's span, or none) is assumed to carry on."""
    if re.fullmatch(r"\d{4}", label):
        return label == f"{day.year:04d}"
    if re.fullmatch(r"\d{4}-\d{2}", label):
        return label == day.isoformat()[:7]
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", label):
        return label == day.isoformat()
    return True


class _Energy:
    """Per-meter per-day kWh and gap upper bounds of the month (from ``daily``)."""

    def __init__(self, rows: Iterable[tuple[str, str, int, float, float]]) -> None:
        self.mwh: dict[str, dict[str, int]] = {}  # whole mWh at rest: sums are exact
        self.gap_kwh: dict[str, dict[str, float]] = {}
        self.gap_s: dict[str, float] = {}
        for meter, day, mwh, gap_kwh, gap_s in rows:
            self.mwh.setdefault(meter, {})[day] = int(mwh)
            self.gap_kwh.setdefault(meter, {})[day] = float(gap_kwh)
            self.gap_s[meter] = self.gap_s.get(meter, 0.0) + float(gap_s)

    @property
    def meters(self) -> set[str]:
        return set(self.mwh)

    def day(self, meter: str, day: str) -> float:
        return to_kwh(self.mwh.get(meter, {}).get(day, 0))

    def total(self, meters: Iterable[str], days: Iterable[str] | None = None,
              gaps: bool = False) -> float:
        """kWh (or, with ``gaps``, gap upper bounds) of ``meters`` over ``days`` (all).

        Energy is an exact integer sum of mWh converted once, so it equals what the
        check and ``status`` read from the same rows to the last digit."""
        wanted = None if days is None else list(days)
        if not gaps:
            mwh = 0
            for m in set(meters):
                per = self.mwh.get(m)
                if per:
                    mwh += sum(per.values()) if wanted is None else sum(
                        per.get(d, 0) for d in wanted)
            return to_kwh(mwh)
        out = 0.0
        for m in sorted(set(meters)):  # a fixed order: float sums, hence digests, reproduce
            gp = self.gap_kwh.get(m)
            if gp:
                out += sum(gp.values()) if wanted is None else sum(
                    gp.get(d, 0.0) for d in wanted)
        return out


@dataclass(frozen=True, slots=True)
class _Context:
    """What every rule entry is measured against."""

    config: Config
    pb: Period
    store: Store
    meters: Mapping[str, _Meter]
    energy: _Energy
    alerts: Sequence[Mapping[str, Any]]  # alert events of the month (+ closing ones)
    at_start: Mapping[tuple[str, str], str]  # (rule, scope) -> state when the month began
    state_now: Mapping[tuple[str, str], Mapping[str, Any]]  # alert_state at generation


def _rule_entry(rule: AnyRule, ctx: _Context) -> dict[str, Any]:
    config, pb, store, meters, energy = ctx.config, ctx.pb, ctx.store, ctx.meters, ctx.energy
    scope: str = getattr(rule, "scope", "site")
    if isinstance(rule, ReconcileRule):
        scope = rule.main
    why_not = _in_force(rule, config.site, pb)
    in_force = not why_not
    days = [d.isoformat() for d in pb.days]
    scope_ids = _scope_meters(scope, meters)
    entry: dict[str, Any] = {
        "id": rule.id,
        "kind": rule.kind,
        "scope": scope,
        "source": rule.source,
        "in_force": in_force,
        "not_in_force_reason": why_not,
        "parameters": rule.model_dump(mode="json", by_alias=True),
        "limit": None,
        "unit": None,
        "used": None,
        "used_share": None,
        "measured": {},
    }
    measured_state = "ok"
    if isinstance(rule, EnergyCapRule):
        if rule.period == "calendar_day":
            per_day = {d: energy.total(scope_ids, [d]) for d in days}
            per_day_c = {d: per_day[d] + energy.total(scope_ids, [d], gaps=True) for d in days}
            basis = per_day_c if rule.conservative else per_day
            worst_day = max(days, key=lambda d: basis[d])
            used, used_c = per_day[worst_day], per_day_c[worst_day]
            entry["measured"] = {
                "basis": "largest day of the month",
                "day": worst_day,
                "days_over_limit": sum(1 for d in days if basis[d] >= rule.limit_kwh),
            }
        elif rule.period == "calendar_year":
            ytd = _year_to_date(store, None if scope == "site" else scope_ids, pb)
            used, used_c = ytd
            entry["measured"] = {
                "basis": f"year to date {pb.first_day.year}-01-01 .. {pb.last_day.isoformat()}"}
        else:
            used = energy.total(scope_ids)
            used_c = used + energy.total(scope_ids, gaps=True)
            entry["measured"] = {"basis": "calendar month"}
        value = used_c if rule.conservative else used
        share = _share(value, rule.limit_kwh)
        entry.update(limit=rule.limit_kwh, unit="kWh", used=_kwh(value), used_share=share)
        entry["measured"].update(accounted_kwh=_kwh(used), conservative_kwh=_kwh(used_c),
                                 conservative=rule.conservative)
        if value >= rule.limit_kwh:  # as monitor.rules.evaluate: reaching the limit is a breach
            measured_state = "breach"
        elif rule.warn_at and share >= rule.warn_at[0]:
            measured_state = "warning"
    elif isinstance(rule, PowerCapRule):
        peak_kw, peak_at = _peak_15min(store, scope_ids, pb)
        entry.update(limit=rule.limit_kw, unit="kW", used=peak_kw,
                     used_share=_share(peak_kw, rule.limit_kw))
        entry["measured"] = {"basis": "largest 15-minute average from the ledger "
                                      f"(the rule averages over {rule.window_s:g} s)",
                             "peak_kw": peak_kw, "peak_at": rfc3339_or_none(peak_at)}
    elif isinstance(rule, BanWindowRule):
        exempt = rule.exempt_off_grid and config.site.off_grid
        banned = _banned_days(rule, pb)
        kwh = energy.total(scope_ids, banned)
        entry.update(limit=0.0, unit="kWh", used=_kwh(kwh))  # nothing may be drawn
        entry["measured"] = {
            "basis": "energy drawn on banned local days",
            "banned_days": len(banned),
            "first_banned_day": banned[0] if banned else None,
            "last_banned_day": banned[-1] if banned else None,
            "kwh_on_banned_days": _kwh(kwh),
            "gap_upper_kwh_on_banned_days": _kwh(energy.total(scope_ids, banned, gaps=True)),
            "exempt_off_grid": exempt,
        }
        if kwh > 0:
            measured_state = "breach"
    elif isinstance(rule, StaleDataRule):
        entry["measured"] = {"max_silence_s": rule.max_silence_s}
    elif isinstance(rule, CurtailmentRule):
        entry["measured"] = {"topic": rule.topic}
    elif isinstance(rule, ReconcileRule):
        main = energy.total(_scope_meters(rule.main, meters))
        parts = energy.total(_scope_meters(rule.parts, meters))
        entry["measured"] = {"main_kwh": _kwh(main), "parts_kwh": _kwh(parts),
                             "difference_share": _share(abs(main - parts), main),
                             "tolerance": rule.tolerance}
    own = [dict(a) for a in ctx.alerts if a["rule"] == rule.id]
    entry["state_at_start"] = _worst(*(st for (r, _), st in ctx.at_start.items() if r == rule.id))
    if not in_force:
        measured_state = "ok"  # measured for information only: the rule did not govern
    entry["measured_state"] = measured_state
    entry["worst_state"] = _worst(entry["state_at_start"], measured_state,
                                  *(a["state"] for a in own))
    entry["alerts_firing"] = sum(1 for a in own if a["kind"] == "alert.firing")
    entry["alerts_resolved"] = sum(1 for a in own if a["kind"] == "alert.resolved")
    entry["alerts"] = own
    entry["state_now"] = [dict(v) for (r, _), v in ctx.state_now.items() if r == rule.id]
    return entry


def _year_to_date(store: Store, meter_ids: Sequence[str] | None,
                  pb: Period) -> tuple[float, float]:
    """(kWh, kWh + gap bound) from 1 January to the month's last day; ``None``: every
    meter (the site, including meters that reported only earlier in the year)."""
    if meter_ids is not None and not meter_ids:
        return 0.0, 0.0
    ids = list(meter_ids or ())
    where = f" AND meter IN ({','.join('?' * len(ids))})" if meter_ids is not None else ""
    mwh, gap = store.conn.execute(
        "SELECT coalesce(sum(mwh), 0), coalesce(sum(gap_kwh), 0) FROM daily"
        f" WHERE day BETWEEN ? AND ?{where}",
        (f"{pb.first_day.year:04d}-01-01", pb.last_day.isoformat(), *ids),
    ).fetchone()
    return to_kwh(mwh), to_kwh(mwh) + float(gap)


def _peak_15min(store: Store, meter_ids: Sequence[str],
                pb: Period) -> tuple[float, float | None]:
    """Largest 15-minute average power (kW) of these meters in the month, and its start."""
    if not meter_ids:
        return 0.0, None
    marks = ",".join("?" * len(meter_ids))
    row = store.conn.execute(
        f"SELECT bucket, sum(mwh) AS e FROM ledger WHERE bucket >= ? AND bucket < ?"
        f" AND meter IN ({marks}) GROUP BY bucket ORDER BY e DESC, bucket LIMIT 1",
        (pb.start_ts, pb.end_ts, *meter_ids),
    ).fetchone()
    if row is None or row[1] <= 0:
        return 0.0, None
    return round(to_kwh(row[1]) * 3600.0 / BUCKET_S, 6), float(row[0])


# --------------------------------------------------------------------------- audit


def _audit(store: Store, pb: Period) -> dict[str, Any]:
    conn = store.conn
    entries, in_period = conn.execute(
        "SELECT count(*), coalesce(sum(at >= ? AND at < ?), 0) FROM audit",
        (pb.start_ts, pb.end_ts)).fetchone()
    head = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    out: dict[str, Any] = {
        "entries": int(entries),
        "entries_in_period": int(in_period),
        "head_seq": int(head[0]) if head else None,
        "head_hash": str(head[1]) if head else None,
        "verified": None,
        "checked": None,
        "first_bad_seq": None,
        "reason": "audit verification is not available in this build",
    }
    try:
        verify = importlib.import_module("monitor.store.audit").verify
    except (ImportError, AttributeError):
        return out
    try:
        result = verify(conn)
    except Exception as exc:  # noqa: BLE001 - a log that cannot be checked is reported, not fatal
        out.update(verified=False, reason=f"verification could not run: {exc}")
        return out
    out.update(verified=bool(result.ok), checked=int(result.checked),
               first_bad_seq=result.first_bad_seq, reason=str(result.reason))
    return out


# --------------------------------------------------------------------------- build


def build_report(store: Store, config: Config, period: str, now: float) -> dict[str, Any]:
    """The compliance report of calendar month ``period`` (YYYY-MM, site time zone).

    Pure over ``store``: reads only, never the clock; ``now`` is the generation
    time (it also ends the assessed span of a month still running).  A month
    without data gives a valid report with zeros.  Raises :class:`ValueError` for
    a malformed ``period``.

    All queries run in one read transaction (unless the caller already holds
    one), so a report made while the daemon writes is one consistent snapshot
    of the store: its totals, days and events agree with each other.
    """
    month(period, config.site.tz)  # validate before touching the store
    if store.conn.in_transaction:
        return _build(store, config, period, now)
    with snapshot(store.conn):
        return _build(store, config, period, now)


def _build(store: Store, config: Config, period: str, now: float) -> dict[str, Any]:
    site = config.site
    tz = site.tz
    pb = month(period, tz)
    conn = store.conn
    days = [d.isoformat() for d in pb.days]
    energy = _Energy(conn.execute(
        "SELECT meter, day, mwh, gap_kwh, gap_s FROM daily WHERE day BETWEEN ? AND ?"
        " ORDER BY day, meter", (days[0], days[-1])))
    meters = _meters(store, config, pb, energy.meters)
    assess_end = min(pb.end_ts, max(now, pb.start_ts))
    assessed_s = assess_end - pb.start_ts

    # ---- gaps and anomalies (rows of the month; a gap counts if it overlaps it)
    gaps: list[dict[str, Any]] = []
    unbounded: dict[str, int] = {}
    gap_count: dict[str, int] = {}
    for gid, meter, g0, g1, upper, reason in conn.execute(
        "SELECT id, meter, start_ts, end_ts, upper_kwh, reason FROM gaps"
        " WHERE start_ts < ? AND end_ts > ? ORDER BY start_ts, id", (pb.end_ts, pb.start_ts)
    ):
        inside = min(g1, pb.end_ts) - max(g0, pb.start_ts)
        span = g1 - g0
        gap_count[meter] = gap_count.get(meter, 0) + 1
        if upper is None:
            unbounded[meter] = unbounded.get(meter, 0) + 1
        gaps.append({
            "id": gid, "meter": meter, "start": rfc3339_or_none(g0), "end": rfc3339_or_none(g1),
            "seconds_in_period": round(inside, 3),
            "upper_kwh_in_period": None if upper is None else _kwh(
                upper * (inside / span if span > 0 else 1.0)),
            "reason": reason,
        })
    anomaly_counts: dict[str, dict[str, int]] = {}
    anomaly_items: list[dict[str, Any]] = []
    for aid, meter, ts, kind, value, detail in conn.execute(
        "SELECT id, meter, ts, kind, value, detail FROM anomalies WHERE ts >= ? AND ts < ?"
        " ORDER BY ts, id", (pb.start_ts, pb.end_ts)
    ):
        per = anomaly_counts.setdefault(meter, {})
        per[kind] = per.get(kind, 0) + 1
        if kind not in UNLISTED_ANOMALIES:
            anomaly_items.append({"id": aid, "meter": meter, "at": rfc3339_or_none(ts),
                                  "kind": kind,
                                  "value": value, "detail": detail})
    anomaly_totals: dict[str, int] = {}
    for per in anomaly_counts.values():
        for kind, n in per.items():
            anomaly_totals[kind] = anomaly_totals.get(kind, 0) + n

    # ---- per meter
    meter_rows: list[dict[str, Any]] = []
    for m in meters.values():
        kwh = energy.total([m.id])
        gap_kwh = energy.total([m.id], gaps=True)
        gap_s = energy.gap_s.get(m.id, 0.0)
        covered = 0.0
        since_first: float | None = None
        if m.first_seen is not None and m.last_seen is not None:
            w0 = max(pb.start_ts, m.first_seen)
            w1 = min(assess_end, m.last_seen)
            covered = max(0.0, w1 - w0 - gap_s)
            if w0 < assess_end:
                since_first = _share(covered, assess_end - w0)
        meter_rows.append({
            "id": m.id,
            "device": m.device,
            "group": m.group,
            "rated_kw": m.rated_kw,
            "configured": m.configured,
            "first_seen": rfc3339_or_none(m.first_seen),
            "last_seen": rfc3339_or_none(m.last_seen),
            "accounted_kwh": _kwh(kwh),
            "gap_upper_kwh": _kwh(gap_kwh),
            "conservative_kwh": _kwh(kwh + gap_kwh),
            "gap_s": round(gap_s, 3),
            "gaps": gap_count.get(m.id, 0),
            "gaps_without_upper_bound": unbounded.get(m.id, 0),
            "covered_s": round(covered, 3),
            "completeness": _share(covered, assessed_s),
            "completeness_since_first_seen": since_first,
            "anomalies": dict(sorted(anomaly_counts.get(m.id, {}).items())),
        })

    # ---- per group
    groups: dict[str, list[str]] = {}
    for m in meters.values():
        groups.setdefault(m.group, []).append(m.id)
    group_rows = []
    for name, ids in sorted(groups.items()):
        kwh, gap_kwh = energy.total(ids), energy.total(ids, gaps=True)
        group_rows.append({"group": name, "meters": ids, "accounted_kwh": _kwh(kwh),
                           "gap_upper_kwh": _kwh(gap_kwh),
                           "conservative_kwh": _kwh(kwh + gap_kwh)})

    # ---- per day
    ids = list(meters)
    day_rows = []
    for d in days:
        by_meter = {mid: _kwh(energy.day(mid, d)) for mid in ids}
        kwh, gap_kwh = energy.total(ids, [d]), energy.total(ids, [d], gaps=True)
        day_rows.append({"day": d, "accounted_kwh": _kwh(kwh), "gap_upper_kwh": _kwh(gap_kwh),
                         "conservative_kwh": _kwh(kwh + gap_kwh), "meters": by_meter})

    total_kwh, total_gap = energy.total(ids), energy.total(ids, gaps=True)
    peak_kw, peak_at = _peak_15min(store, ids, pb)

    # ---- events, alerts, orders, dead letters
    events: list[dict[str, Any]] = []
    event_counts: dict[str, int] = {}
    alerts: list[dict[str, Any]] = []
    for row in conn.execute(
        "SELECT event_id, kind, severity, rule, scope, at, body FROM events"
        " WHERE at >= ? AND at < ? ORDER BY at, id", (pb.start_ts, pb.end_ts)
    ):
        kind, severity, body = row[1], row[2], _json_obj(row[6])
        item = _event_item(row, body)
        events.append(item)
        event_counts[kind] = event_counts.get(kind, 0) + 1
        if kind in ALERT_KINDS and not _label_other_month(str(body.get("period") or ""), pb):
            alerts.append({**item, "state": _event_state(kind, severity, body),
                           "after_period_end": False})
    # The alert machine closes a calendar period's alert at the first check of the
    # next period, labelled with the old period: that event is this month's outcome.
    for row in conn.execute(
        "SELECT event_id, kind, severity, rule, scope, at, body FROM events"
        " WHERE kind = 'alert.resolved' AND at >= ? ORDER BY at, id", (pb.end_ts,)
    ):
        body = _json_obj(row[6])
        if _label_in_month(str(body.get("period") or ""), pb):
            alerts.append({**_event_item(row, body),
                           "state": "ok", "after_period_end": True})
    # State at the start: the last alert event before it, unless that event's
    # calendar period ended before this month began (a new period starts at ok).
    at_start: dict[tuple[str, str], str] = {}
    for rule, scope, kind, severity, body_text, _at in conn.execute(
        "SELECT rule, scope, kind, severity, body, max(at) FROM events"
        " WHERE kind IN ('alert.firing', 'alert.resolved') AND at < ? GROUP BY rule, scope",
        (pb.start_ts,),
    ):
        body = _json_obj(body_text)
        carried = _label_covers(str(body.get("period") or ""), pb.first_day)
        at_start[(rule, scope)] = _event_state(kind, severity, body) if carried else "ok"
    state_now: dict[tuple[str, str], dict[str, Any]] = {}
    for rule, scope, state, level, since, period_label, data in conn.execute(
        "SELECT rule, scope, state, level, since, period, data FROM alert_state"
        " ORDER BY rule, scope"
    ):
        sd = _json_obj(data)
        state_now[(rule, scope)] = {
            "scope": scope, "state": state, "level": level, "since": rfc3339_or_none(since),
            "period": period_label, "value": _num(sd.get("value")),
            "limit": _num(sd.get("limit")), "unit": sd.get("unit")}

    ctx = _Context(config, pb, store, meters, energy, alerts, at_start, state_now)
    rules = [_rule_entry(r, ctx) for r in config.rules]

    orders: list[dict[str, Any]] = []
    order_counts: dict[str, int] = {}
    for row in conn.execute(
        "SELECT order_id, action, scope, rule, meters, target_kw, reason, issued_at, state,"
        " resends, updated_at, actor, dry_run FROM orders WHERE issued_at >= ? AND issued_at < ?"
        " ORDER BY issued_at, order_id", (pb.start_ts, pb.end_ts)
    ):
        try:
            order_meters = json.loads(row[4] or "[]")
        except ValueError:
            order_meters = [row[4]]
        orders.append({
            "order_id": row[0], "action": row[1], "scope": row[2], "rule": row[3],
            "meters": order_meters if isinstance(order_meters, list) else [order_meters],
            "target_kw": row[5], "reason": row[6], "issued_at": rfc3339_or_none(row[7]),
            "outcome": row[8], "resends": row[9], "updated_at": rfc3339_or_none(row[10]),
            "actor": row[11], "dry_run": bool(row[12]),
        })
        order_counts[row[8]] = order_counts.get(row[8], 0) + 1

    dead_by_reason = {
        str(reason): int(n) for reason, n in conn.execute(
            "SELECT reason, count(*) FROM dead_letters WHERE received_at >= ? AND received_at < ?"
            " GROUP BY reason ORDER BY reason", (pb.start_ts, pb.end_ts))
    }

    covered_total = sum(r["covered_s"] for r in meter_rows)
    report: dict[str, Any] = {
        "report": "energy-monitor compliance report",
        "format_version": FORMAT_VERSION,
        "software": {"name": "energy-monitor", "version": __version__},
        "generated_at": rfc3339_or_none(now),
        "config_sha256": config.digest,
        "site": {
            "id": site.id, "name": site.name, "region": site.region,
            "subregion": site.subregion, "category": site.category,
            "timezone": site.timezone, "off_grid": site.off_grid,
        },
        "period": {
            "label": pb.label,
            "timezone": site.timezone,
            "first_day": days[0],
            "last_day": days[-1],
            "days": len(days),
            "start_local": local_iso(pb.start_ts, tz),
            "end_local": local_iso(pb.end_ts, tz),
            "start_utc": rfc3339_or_none(pb.start_ts),
            "end_utc": rfc3339_or_none(pb.end_ts),
            "seconds": round(pb.seconds, 3),
            "hours": round(pb.seconds / 3600.0, 6),
            "complete": now >= pb.end_ts,
            "assessed_until_utc": rfc3339_or_none(assess_end),
            "assessed_s": round(assessed_s, 3),
        },
        "totals": {
            "accounted_kwh": _kwh(total_kwh),
            "gap_upper_kwh": _kwh(total_gap),
            "conservative_kwh": _kwh(total_kwh + total_gap),
            "gaps_without_upper_bound": sum(unbounded.get(m, 0) for m in ids),
            "meters": len(ids),
            "completeness": _share(covered_total, assessed_s * len(ids)) if ids else 0.0,
            "peak_15min_kw": peak_kw,
            "peak_15min_at": rfc3339_or_none(peak_at),
        },
        "meters": meter_rows,
        "groups": group_rows,
        "days": day_rows,
        "gaps": gaps,
        "anomalies": {"total": sum(anomaly_totals.values()),
                      "by_kind": dict(sorted(anomaly_totals.items())),
                      "unlisted_kinds": sorted(UNLISTED_ANOMALIES),
                      "items": anomaly_items},
        "dead_letters": {"count": sum(dead_by_reason.values()), "by_reason": dead_by_reason},
        "rules": rules,
        "events": {"total": len(events), "by_kind": dict(sorted(event_counts.items())),
                   "items": events},
        "orders": {"total": len(orders), "by_outcome": dict(sorted(order_counts.items())),
                   "items": orders},
        "audit": _audit(store, pb),
    }
    report["sha256"] = content_sha256(report)
    return report


# --------------------------------------------------------------------------- JSON


def to_json(report: Mapping[str, Any]) -> str:
    """The report as indented JSON (UTF-8 text), its ``sha256`` recomputed."""
    doc = {**report, "sha256": content_sha256(report)}
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- CSV


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return str(value)


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return [(prefix, value)]


def csv_sections(report: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The CSV sections as ``name -> (header, rows)``, in output order."""
    sha = content_sha256(report)
    meta: list[list[Any]] = []
    for key in ("report", "format_version", "software", "generated_at", "config_sha256",
                "site", "period", "totals"):
        meta.extend([k, v] for k, v in _flat(key, report[key]))
    meta.append(["dead_letters.count", report["dead_letters"]["count"]])
    meta.append(["anomalies.total", report["anomalies"]["total"]])
    meta.append(["orders.total", report["orders"]["total"]])
    meta.extend([k, v] for k, v in _flat("audit", report["audit"]))
    meta.append(["sha256", sha])

    ids = [m["id"] for m in report["meters"]]
    by_day: list[list[Any]] = []
    for d in report["days"]:
        by_day.append([d["day"], *(d["meters"][i] for i in ids), d["accounted_kwh"],
                       d["gap_upper_kwh"], d["conservative_kwh"]])
    by_day.append(["total", *(m["accounted_kwh"] for m in report["meters"]),
                   report["totals"]["accounted_kwh"], report["totals"]["gap_upper_kwh"],
                   report["totals"]["conservative_kwh"]])

    meter_cols = ["id", "device", "group", "rated_kw", "configured", "first_seen", "last_seen",
                  "accounted_kwh", "gap_upper_kwh", "conservative_kwh", "gap_s", "gaps",
                  "gaps_without_upper_bound", "covered_s", "completeness",
                  "completeness_since_first_seen", "anomalies"]
    group_cols = ["group", "meters", "accounted_kwh", "gap_upper_kwh", "conservative_kwh"]
    rule_cols = ["id", "kind", "scope", "in_force", "not_in_force_reason", "limit", "unit",
                 "used", "used_share", "state_at_start", "measured_state", "worst_state",
                 "alerts_firing", "alerts_resolved", "source"]
    alert_cols = ["rule", "scope", "kind", "state", "severity", "at", "after_period_end",
                  "period", "value", "limit", "unit", "message"]
    order_cols = ["order_id", "issued_at", "action", "scope", "rule", "meters", "target_kw",
                  "outcome", "resends", "updated_at", "actor", "dry_run", "reason"]
    event_cols = ["at", "kind", "severity", "rule", "scope", "period", "value", "limit", "unit",
                  "message", "event_id"]
    anomaly_cols = ["at", "meter", "kind", "value", "detail", "id"]
    gap_cols = ["meter", "start", "end", "seconds_in_period", "upper_kwh_in_period", "reason",
                "id"]

    def rows(items: Iterable[Mapping[str, Any]], cols: Sequence[str]) -> list[list[Any]]:
        return [[it.get(c) for c in cols] for it in items]

    alerts = [a for r in report["rules"] for a in r["alerts"]]
    return {
        "report": (["field", "value"], meta),
        "energy_by_day_kwh": (["day", *ids, "site_accounted_kwh", "site_gap_upper_kwh",
                               "site_conservative_kwh"], by_day),
        "meters": (meter_cols, rows(report["meters"], meter_cols)),
        "groups": (group_cols, rows(report["groups"], group_cols)),
        "rules": (rule_cols, rows(report["rules"], rule_cols)),
        "alerts": (alert_cols, rows(alerts, alert_cols)),
        "orders": (order_cols, rows(report["orders"]["items"], order_cols)),
        "events": (event_cols, rows(report["events"]["items"], event_cols)),
        "anomalies": (anomaly_cols, rows(report["anomalies"]["items"], anomaly_cols)),
        "gaps": (gap_cols, rows(report["gaps"], gap_cols)),
        "dead_letters": (["reason", "count"],
                         [[k, v] for k, v in report["dead_letters"]["by_reason"].items()]),
    }


def to_csv(report: Mapping[str, Any]) -> str:
    """Sections, each a title row ``[name]``, a header row and data rows, separated by
    an empty row.  The first is ``[report]`` (field, value); the second the
    day-by-meter table ``[energy_by_day_kwh]``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for i, (name, (header, body)) in enumerate(csv_sections(report).items()):
        if i:
            w.writerow([])
        w.writerow([f"[{name}]"])
        w.writerow(header)
        w.writerows([_cell(v) for v in row] for row in body)
    return buf.getvalue()


def parse_csv(text: str) -> dict[str, list[dict[str, str]]]:
    """Read :func:`to_csv` output back: ``section -> rows as dicts`` (all values text)."""
    out: dict[str, list[dict[str, str]]] = {}
    name: str | None = None
    header: list[str] | None = None
    for row in csv.reader(io.StringIO(text)):
        if not row:
            name = header = None
        elif name is None:
            name = row[0].strip("[]")
            out[name] = []
        elif header is None:
            header = row
        else:
            out[name].append(dict(zip(header, row, strict=True)))
    return out


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#111}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:15px;margin:1.6em 0 .4em;
border-bottom:1px solid #999}
table{border-collapse:collapse;margin:.3em 0 1em}th,td{border:1px solid #bbb;
padding:2px 6px;vertical-align:top}
th{background:#eee;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:bold;background:#f6f6f6}
.breach{color:#a00;font-weight:bold}.warning{color:#a60;font-weight:bold}.ok{color:#070}
.muted{color:#666}footer{margin-top:2em;font-size:11px;color:#444;word-break:break-all}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{font-weight:bold}dd{margin:0}
@media print{body{margin:1cm;font-size:10px}h2{break-after:avoid}tr{break-inside:avoid}}
"""


def _e(value: Any) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1e15 else repr(value)
    if isinstance(value, list):
        return html.escape(", ".join(str(v) for v in value))
    if isinstance(value, dict):
        return html.escape(", ".join(f"{k}: {v}" for k, v in value.items()))
    return html.escape(str(value))


def _pct(value: Any) -> str:
    return "\u2014" if value is None else f"{float(value) * 100:.2f} %"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]],
           total: Sequence[Any] | None = None, numeric: Iterable[int] = ()) -> str:
    num = set(numeric)
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in header),
           "</tr></thead><tbody>"]
    body = list(rows)
    if not body:
        out.append(f'<tr><td colspan="{len(header)}" class="muted">none</td></tr>')
    for row in body:
        out.append("<tr>" + "".join(
            f'<td class="n">{c}</td>' if i in num else f"<td>{c}</td>"
            for i, c in enumerate(row)) + "</tr>")
    if total is not None:
        out.append('<tr class="total">' + "".join(
            f'<td class="n">{c}</td>' if i in num else f"<td>{c}</td>"
            for i, c in enumerate(total)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _state(s: Any) -> str:
    cls = s if s in _RANK else "muted"
    return f'<span class="{cls}">{_e(s)}</span>'


def to_html(report: Mapping[str, Any]) -> str:
    """A self-contained printable page (inline CSS, no scripts, no external assets)."""
    sha = content_sha256(report)
    site, per, tot, aud = report["site"], report["period"], report["totals"], report["audit"]
    title = f"Energy compliance report {per['label']} \u2014 {site['id']}"
    tz = ZoneInfo(per["timezone"])

    def when(iso_utc: str | None) -> str:
        """Times are printed in the site's zone with their offset (the JSON keeps UTC)."""
        if iso_utc is None:
            return "\u2014"
        t = dt.datetime.fromtimestamp(parse_rfc3339(iso_utc), tz)
        return html.escape(t.strftime("%Y-%m-%d %H:%M:%S %z"))

    p: list[str] = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">{_e(site["name"])}. Times are local to {_e(per["timezone"])}, '
        "with their UTC offset.</p>",
        "<h2>Site and period</h2><dl>",
    ]
    for label, value in (
        ("Site id", site["id"]), ("Name", site["name"]), ("Region", site["region"]),
        ("Subregion", site["subregion"]), ("Category", site["category"]),
        ("Off grid", site["off_grid"]), ("Time zone", per["timezone"]),
        ("Period", f"{per['label']} ({per['days']} days, {per['hours']:g} h)"),
        ("Start", f"{per['start_local']} = {per['start_utc']}"),
        ("End (exclusive)", f"{per['end_local']} = {per['end_utc']}"),
        ("Period complete", per["complete"]),
        ("Assessed until", when(per["assessed_until_utc"])),
    ):
        p.append(f"<dt>{html.escape(label)}</dt><dd>{_e(value)}</dd>")
    p.append("</dl>")

    p.append("<h2>Energy</h2><dl>")
    for label, value in (
        ("Accounted", f"{tot['accounted_kwh']:,.3f} kWh"),
        ("Gap upper bound", f"{tot['gap_upper_kwh']:,.3f} kWh"),
        ("Conservative total", f"{tot['conservative_kwh']:,.3f} kWh"),
        ("Gaps without an upper bound", tot["gaps_without_upper_bound"]),
        ("Data completeness", _pct(tot["completeness"])),
        ("Peak 15-min average", f"{tot['peak_15min_kw']:,.3f} kW at {when(tot['peak_15min_at'])}"),
    ):
        p.append(f"<dt>{html.escape(label)}</dt><dd>{_e(value)}</dd>")
    p.append("</dl>")

    p.append("<h2>Limits and rules</h2>")
    p.append(_table(
        ["rule", "kind", "scope", "in force", "limit", "used", "used share", "state at start",
         "worst state", "alerts firing", "source"],
        ([_e(r["id"]), _e(r["kind"]), _e(r["scope"]),
          _e(r["in_force"]) + (f' <span class="muted">({_e(r["not_in_force_reason"])})</span>'
                               if r["not_in_force_reason"] else ""),
          "" if r["limit"] is None else f"{_e(r['limit'])} {_e(r['unit'])}",
          "" if r["used"] is None else f"{_e(r['used'])} {_e(r['unit'])}",
          _pct(r["used_share"]), _state(r["state_at_start"]), _state(r["worst_state"]),
          _e(r["alerts_firing"]), _e(r["source"])] for r in report["rules"]),
        numeric=(4, 5, 6, 9)))
    alerts = [a for r in report["rules"] for a in r["alerts"]]
    p.append("<h3>Alerts in the period</h3>")
    p.append(_table(["at", "rule", "scope", "event", "state", "value", "limit",
                     "message"],
                    ([when(a["at"]), _e(a["rule"]), _e(a["scope"]), _e(a["kind"]),
                      _state(a["state"]), _e(a["value"]), _e(a["limit"]), _e(a["message"])]
                     for a in alerts), numeric=(5, 6)))

    p.append("<h2>Orders issued</h2>")
    p.append(_table(["order", "issued", "action", "scope", "rule", "meters", "outcome",
                     "resends", "dry run", "reason"],
                    ([_e(o["order_id"]), when(o["issued_at"]), _e(o["action"]), _e(o["scope"]),
                      _e(o["rule"]),
                      _e(o["meters"]), _e(o["outcome"]), _e(o["resends"]), _e(o["dry_run"]),
                      _e(o["reason"])] for o in report["orders"]["items"])))

    p.append("<h2>Meters</h2>")
    p.append(_table(
        ["meter", "group", "rated kW", "first seen", "last seen", "accounted kWh",
         "gap upper kWh", "conservative kWh", "gap time (h)", "completeness",
         "since first seen", "anomalies"],
        ([_e(m["id"]), _e(m["group"]), _e(m["rated_kw"]), when(m["first_seen"]),
          when(m["last_seen"]), _e(m["accounted_kwh"]), _e(m["gap_upper_kwh"]),
          _e(m["conservative_kwh"]), _e(m["gap_s"] / 3600.0), _pct(m["completeness"]),
          _pct(m["completeness_since_first_seen"]), _e(m["anomalies"])]
         for m in report["meters"]),
        total=["total", "", "", "", "", _e(tot["accounted_kwh"]), _e(tot["gap_upper_kwh"]),
               _e(tot["conservative_kwh"]), "", _pct(tot["completeness"]), "", ""],
        numeric=(2, 5, 6, 7, 8, 9, 10)))
    p.append("<h2>Groups</h2>")
    p.append(_table(["group", "meters", "accounted kWh", "gap upper kWh", "conservative kWh"],
                    ([_e(g["group"] or "(none)"), _e(g["meters"]), _e(g["accounted_kwh"]),
                      _e(g["gap_upper_kwh"]), _e(g["conservative_kwh"])]
                     for g in report["groups"]), numeric=(2, 3, 4)))

    p.append("<h2>Energy per day (kWh)</h2>")
    meter_ids = [m["id"] for m in report["meters"]]
    if len(meter_ids) <= HTML_MAX_METER_COLUMNS:
        cols = [(mid, [mid]) for mid in meter_ids]
    else:
        cols = [(g["group"] or "(none)", g["meters"]) for g in report["groups"]]
    ncols = len(cols)
    p.append(_table(
        ["day", *(c for c, _ in cols), "site", "gap upper", "conservative"],
        ([_e(d["day"]), *(_e(sum(d["meters"][i] for i in ms)) for _, ms in cols),
          _e(d["accounted_kwh"]), _e(d["gap_upper_kwh"]), _e(d["conservative_kwh"])]
         for d in report["days"]),
        total=["total", *(_e(sum(m["accounted_kwh"] for m in report["meters"] if m["id"] in ms))
                          for _, ms in cols),
               _e(tot["accounted_kwh"]), _e(tot["gap_upper_kwh"]), _e(tot["conservative_kwh"])],
        numeric=range(1, ncols + 4)))

    an = report["anomalies"]
    p.append(f"<h2>Anomalies ({an['total']})</h2>")
    p.append(f"<p>By kind: {_e(an['by_kind']) if an['by_kind'] else 'none'}. "
             f"Not listed: {_e(an['unlisted_kinds'])}.</p>")
    p.append(_table(["at", "meter", "kind", "value", "detail"],
                    ([when(a["at"]), _e(a["meter"]), _e(a["kind"]), _e(a["value"]),
                      _e(a["detail"])] for a in an["items"]), numeric=(3,)))
    p.append(f"<h2>Data gaps ({len(report['gaps'])})</h2>")
    p.append(_table(["meter", "start", "end", "hours in period",
                     "upper bound kWh", "reason"],
                    ([_e(g["meter"]), when(g["start"]), when(g["end"]),
                      _e(g["seconds_in_period"] / 3600.0), _e(g["upper_kwh_in_period"]),
                      _e(g["reason"])] for g in report["gaps"]), numeric=(3, 4)))
    dl = report["dead_letters"]
    p.append(f"<h2>Dead letters ({dl['count']})</h2>")
    p.append(_table(["reason", "count"],
                    ([_e(k), _e(v)] for k, v in dl["by_reason"].items()), numeric=(1,)))
    ev = report["events"]
    p.append(f"<h2>Events ({ev['total']})</h2>")
    p.append(_table(["at", "kind", "severity", "rule", "scope", "message"],
                    ([when(e["at"]), _e(e["kind"]), _e(e["severity"]), _e(e["rule"]),
                      _e(e["scope"]), _e(e["message"])] for e in ev["items"])))

    p.append("<h2>Audit log</h2><dl>")
    verified = aud["verified"]
    vtext = ("not checked" if verified is None else
             f"passes ({aud['checked']} entries checked)" if verified else
             f"FAILS at entry {aud['first_bad_seq']}: {aud['reason']}")
    for label, value in (("Entries", aud["entries"]),
                         ("Entries in the period", aud["entries_in_period"]),
                         ("Head", f"#{aud['head_seq']} {aud['head_hash']}"
                          if aud["head_seq"] is not None else "empty log"),
                         ("Verification", vtext)):
        p.append(f"<dt>{html.escape(label)}</dt><dd>{_e(value)}</dd>")
    p.append("</dl>")

    sw = report["software"]
    p.append(
        f"<footer><p>Generated {_e(report['generated_at'])} by {_e(sw['name'])} "
        f"{_e(sw['version'])}; configuration sha256 {_e(report['config_sha256'])}.</p>"
        f"<p>Report content sha256: <code>{sha}</code> (canonical JSON of the JSON "
        f"report without its <code>sha256</code> key).</p></footer>")
    p.extend(["</body>", "</html>", ""])
    return "\n".join(p)


# --------------------------------------------------------------------------- CLI entry


RENDERERS = {"json": to_json, "csv": to_csv, "html": to_html}


def _write_atomic(path: Path, text: str) -> None:
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(config: Config, period: str, fmt: str = "json", out_path: Path | str | None = None,
        *, now: float | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """``energy-monitor report``: build, render, write to ``out_path`` or stdout.

    Raises :class:`ValueError` for a malformed ``period`` or an unknown ``fmt``
    (a usage error, before anything is opened).  Returns 0, or 1 when the store
    cannot be read or the output cannot be written (the reason on ``stderr``).
    The file is replaced atomically: a reader never sees half a report.
    """
    parse_month(period)
    if fmt not in RENDERERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out, err = stdout or sys.stdout, stderr or sys.stderr
    db = Path(config.storage.path)
    try:
        store = Store(db, readonly=True)
    except StoreError as exc:
        print(f"cannot open the store: {exc}", file=err)
        return 1
    try:
        report = build_report(store, config, period, time.time() if now is None else now)
    except Exception as exc:  # noqa: BLE001 - any read failure is a run-time failure, exit 1
        print(f"cannot build the report: {exc}", file=err)
        return 1
    finally:
        store.close()
    text = RENDERERS[fmt](report)
    if out_path is None:
        out.write(text)
        out.flush()
        return 0
    try:
        _write_atomic(Path(out_path), text)
    except OSError as exc:
        print(f"cannot write {out_path}: {exc}", file=err)
        return 1
    print(f"report {report['period']['label']} written to {out_path} "
          f"(sha256 {report['sha256']})", file=err)
    return 0
