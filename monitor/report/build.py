"""The compliance report of one calendar month: the document (SPEC ``energy-monitor report``).

:func:`build_report` reads the store (through :class:`monitor.report.read.Reader`,
in one read snapshot) and returns one JSON-ready dict, the report document;
:mod:`monitor.report.render` turns that one document into JSON, CSV and HTML,
so every format shows the same figures under the same digest.  The build is
pure over the store: the generation time ``now`` is passed in, the clock is
never read, so the same store, configuration and ``now`` give the same report
(and the same digest).

What is counted, and how (see ``docs/report.md`` for the reader's view):

* The month is the calendar month in the site's time zone
  (:func:`monitor.core.periods.month`): from local midnight of its first day to
  local midnight of the first day of the next month, so a month with a DST
  change is 743 or 745 hours long.  A month that has not begun at ``now`` has
  no report (:class:`PeriodNotStartedError`).
* Energy is the ``daily`` rollup (accounted kWh per meter per local day) summed
  over the month's local days; it is the same figure ``status`` and the rules
  use.  ``gap_upper_kwh`` is the upper bound of the energy that may have been
  drawn while data were missing (``rated_kw`` x gap duration); the
  conservative total is accounted + that bound.
* Completeness of a meter is the share of the assessed span (the month, or the
  part of it before ``now`` while it is still running) that its data cover:
  from its first reading (or the month's start) to its last reading (or the
  month's end), minus the data gaps recorded in that time.
* A report is ``complete`` only when the month has ended and monitoring had
  begun (the site's first reading) by the month's first instant.

Only reads: the store is never written by a report.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monitor import __version__
from monitor.config import (
    BanWindowRule,
    Config,
    CurtailmentRule,
    EnergyCapRule,
    MeterConfig,
    PowerCapRule,
    ReconcileRule,
    SiteConfig,
    StaleDataRule,
)
from monitor.core.periods import Period, local_midnight, month
from monitor.core.timefmt import local_iso, rfc3339_or_none
from monitor.report.read import EventRow, Reader
from monitor.rules.evaluate import AnyRule, ban_spans, in_effect, matches_site
from monitor.store.db import snapshot
from monitor.store.ledger import Store, to_kwh

FORMAT_VERSION = 2
STATES = ("ok", "warning", "breach")
ALERT_KINDS = ("alert.firing", "alert.resolved")
_RANK = {s: i for i, s in enumerate(STATES)}
# Jitter (a counter dropping by less than jitter_kwh) changes nothing and can be
# frequent; it is counted but not listed.
UNLISTED_ANOMALIES = frozenset({"jitter"})
#: the site filters of a rule, and the site key each is matched against
SITE_FILTERS = {"categories": "category", "regions": "region", "subregions": "subregion",
                "exclude_subregions": "subregion"}


class PeriodNotStartedError(ValueError):
    """The report's month has not begun at the generation time: there is nothing to
    report yet (a usage error, not an empty report)."""


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


def _event_item(row: EventRow, body: Mapping[str, Any]) -> dict[str, Any]:
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
    edited.  Every format of one report carries this same digest.
    """
    body = {k: v for k, v in report.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_started(pb: Period, now: float) -> None:
    """Raise :class:`PeriodNotStartedError` when month ``pb`` begins after ``now``."""
    if now < pb.start_ts:
        raise PeriodNotStartedError(
            f"period {pb.label} has not started: it begins {local_iso(pb.start_ts, pb.tz)} "
            "in the site's time zone; a report covers a month that has begun")


# --------------------------------------------------------------------------- meters


@dataclass(slots=True)
class _Meter:
    id: str
    device: str
    group: str
    rated_kw: float | None
    configured: MeterConfig | None
    first_seen: float | None
    last_seen: float | None


def _meters(reader: Reader, config: Config, pb: Period,
            with_data: set[str]) -> dict[str, _Meter]:
    """Meters the report covers: every configured meter, and every stored meter that
    existed before the month ended or has data in it."""
    configured = {m.id: m for m in config.meters}
    out: dict[str, _Meter] = {}
    for row in reader.meters():
        mc = configured.get(row.id)
        if mc is None and row.id not in with_data and (
                row.first_seen is None or row.first_seen >= pb.end_ts):
            continue  # appeared after the month (or never reported): not part of it
        out[row.id] = _Meter(
            row.id, row.device, mc.group if mc else row.group,
            mc.rated_kw if mc else None, mc, row.first_seen, row.last_seen)
    for mid, mc in configured.items():
        if mid not in out:
            out[mid] = _Meter(mid, ", ".join(mc.devices), mc.group, mc.rated_kw, mc,
                              None, None)
    for mid in with_data - out.keys():
        out[mid] = _Meter(mid, "", "", None, None, None, None)
    return dict(sorted(out.items()))


def _passport(mc: MeterConfig | None, pb: Period) -> dict[str, Any]:
    """The meter's passport (``[[meters]]`` serial, model, verification dates) and
    whether its verification covered the whole month (``None``: no date given)."""
    last = mc.verification_date if mc else None
    nxt = mc.next_verification_date if mc else None
    covered: bool | None = None
    if last is not None:
        covered = last <= pb.first_day and (nxt is None or nxt > pb.last_day)
    elif nxt is not None and nxt <= pb.last_day:
        covered = False  # due before the month ended: not valid all month
    return {"serial": mc.serial if mc else "", "model": mc.model if mc else "",
            "verification_date": last.isoformat() if last else None,
            "next_verification_date": nxt.isoformat() if nxt else None,
            "verified_for_period": covered}


def _scope_meters(scope: str, meters: Mapping[str, _Meter]) -> list[str]:
    kind, _, name = scope.partition(":")
    if kind == "group":
        return [m.id for m in meters.values() if m.group == name]
    if kind == "meter":
        return [name] if name in meters else []
    return list(meters)


# --------------------------------------------------------------------------- rules


def _not_in_force(rule: AnyRule, site: SiteConfig, pb: Period) -> dict[str, Any] | None:
    """Why ``rule`` does not govern this site in this month, as data (``None``: it does).

    ``reason`` is ``off_grid_exempt``, ``site_filters`` (with each filter the site
    fails: the rule's values and the site's) or ``not_in_effect`` (with the
    rule's dates).  The decision is :func:`monitor.rules.evaluate.matches_site` and
    :func:`~monitor.rules.evaluate.in_effect` (the daemon's own), so the report
    never disagrees with what was enforced; each filter is tested alone, with
    the rule's other filters cleared.
    """
    if not matches_site(rule, site):
        if isinstance(rule, BanWindowRule) and rule.exempt_off_grid and site.off_grid:
            return {"reason": "off_grid_exempt", "filters": []}
        failing = []
        for key, site_key in SITE_FILTERS.items():
            values = list(getattr(rule, key))
            if not values:
                continue
            alone: dict[str, Any] = {k: [] for k in SITE_FILTERS if k != key}
            if isinstance(rule, BanWindowRule):
                alone["exempt_off_grid"] = False
            if not matches_site(rule.model_copy(update=alone), site):
                failing.append({"filter": key, "rule": values, "site_key": site_key,
                                "site": getattr(site, site_key)})
        return {"reason": "site_filters", "filters": failing}
    if not any(in_effect(rule, day) for day in pb.days):
        return {"reason": "not_in_effect",
                "effective_from": rule.effective_from.isoformat() if rule.effective_from
                else None,
                "effective_until": rule.effective_until.isoformat() if rule.effective_until
                else None}
    return None


def _names(values: Sequence[str]) -> str:
    return ", ".join(values)


def not_in_force_words(why: Mapping[str, Any] | None) -> str:
    """The English sentence for :func:`_not_in_force` ('' when the rule applies).

    The HTML pages word it from the same data in their own language."""
    if why is None:
        return ""
    if why["reason"] == "off_grid_exempt":
        return ("exempt: the site is off grid, and the rule exempts sites on their own "
                "isolated generation")
    if why["reason"] == "not_in_effect":
        since, until = why["effective_from"], why["effective_until"]
        span = (f"from {since} until {until}" if since and until else
                f"from {since}" if since else f"until {until}")
        return f"not in effect in this period: the rule is in effect {span}"
    parts = []
    for f in why["filters"]:
        site_value = f["site"] or "none set"
        rule_values = _names(f["rule"])
        if f["filter"] == "categories":
            parts.append(f"it applies only to sites of category {rule_values}, and this "
                         f"site's category is {site_value}")
        elif f["filter"] == "regions":
            parts.append(f"it applies only in region {rule_values}, and this site's "
                         f"region is {site_value}")
        elif f["filter"] == "subregions":
            parts.append(f"it applies only in subregion {rule_values}, and this site's "
                         f"subregion is {site_value}")
        else:
            parts.append(f"it does not apply in subregion {rule_values}, and this site's "
                         f"subregion is {site_value}")
    return "the site is outside the rule's filters: " + "; ".join(parts)


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
    reader: Reader
    meters: Mapping[str, _Meter]
    energy: _Energy
    alerts: Sequence[Mapping[str, Any]]  # alert events of the month (+ closing ones)
    at_start: Mapping[tuple[str, str], str]  # (rule, scope) -> state when the month began
    state_now: Mapping[tuple[str, str], Mapping[str, Any]]  # alert_state at generation


def _rule_entry(rule: AnyRule, ctx: _Context) -> dict[str, Any]:
    config, pb, reader, meters, energy = ctx.config, ctx.pb, ctx.reader, ctx.meters, ctx.energy
    scope: str = getattr(rule, "scope", "site")
    if isinstance(rule, ReconcileRule):
        scope = rule.main
    why_not = _not_in_force(rule, config.site, pb)
    in_force = why_not is None
    days = [d.isoformat() for d in pb.days]
    scope_ids = _scope_meters(scope, meters)
    entry: dict[str, Any] = {
        "id": rule.id,
        "kind": rule.kind,
        "scope": scope,
        "source": rule.source,
        "in_force": in_force,
        "not_in_force_reason": not_in_force_words(why_not),
        "not_in_force": why_not,
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
            ytd = reader.energy_between_days(None if scope == "site" else scope_ids,
                                             dt.date(pb.first_day.year, 1, 1), pb.last_day)
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
        peak_kw, peak_at = reader.peak_15min(scope_ids, pb.start_ts, pb.end_ts)
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


# --------------------------------------------------------------------------- chart


def _cap_in_force(config: Config, pb: Period, period: str) -> EnergyCapRule | None:
    """The tightest site-wide ``energy_cap`` of ``period`` that governs the month."""
    caps = [r for r in config.rules
            if isinstance(r, EnergyCapRule) and r.scope == "site" and r.period == period
            and _not_in_force(r, config.site, pb) is None]
    return min(caps, key=lambda r: (r.limit_kwh, r.id)) if caps else None


def _chart(config: Config, pb: Period, energy: _Energy, ids: Sequence[str],
           assess_end: float) -> dict[str, Any]:
    """Daily site energy against the monthly cap pro-rated by each day's length, and
    the running total against the cap (the figures the HTML chart draws).

    The cap is the tightest site-wide ``calendar_month`` ``energy_cap`` in force
    (``None`` when there is none); energy is conservative when that rule is.  A
    day's share of the cap is its length over the month's (a 25-hour DST day has a
    larger share).  Days that had not begun at generation time have no energy
    (``None``)."""
    cap = _cap_in_force(config, pb, "calendar_month")
    day_cap = _cap_in_force(config, pb, "calendar_day")
    conservative = bool(cap and cap.conservative)
    rows: list[dict[str, Any]] = []
    running = 0.0
    for d in pb.days:
        start = local_midnight(d, pb.tz)
        end = local_midnight(d + dt.timedelta(days=1), pb.tz)
        label = d.isoformat()
        kwh: float | None = None
        if start < assess_end:
            kwh = energy.total(ids, [label])
            if conservative:
                kwh += energy.total(ids, [label], gaps=True)
            running += kwh
        rows.append({
            "day": label,
            "kwh": None if kwh is None else _kwh(kwh),
            "prorated_limit_kwh": None if cap is None else _kwh(
                cap.limit_kwh * (end - start) / pb.seconds),
            "cumulative_kwh": None if kwh is None else _kwh(running),
            "cumulative_limit_kwh": None if cap is None else _kwh(
                cap.limit_kwh * (end - pb.start_ts) / pb.seconds),
        })
    return {
        "rule": cap.id if cap else None,
        "limit_kwh": cap.limit_kwh if cap else None,
        "basis": "conservative" if conservative else "accounted",
        "daily_rule": day_cap.id if day_cap else None,
        "daily_limit_kwh": day_cap.limit_kwh if day_cap else None,
        "days": rows,
    }


# --------------------------------------------------------------------------- build


def build_report(store: Store, config: Config, period: str, now: float) -> dict[str, Any]:
    """The compliance report of calendar month ``period`` (YYYY-MM, site time zone).

    Pure over ``store``: reads only, never the clock; ``now`` is the generation
    time (it also ends the assessed span of a month still running).  A month
    without data gives a valid report with zeros.  Raises :class:`ValueError` for
    a malformed ``period``, and :class:`PeriodNotStartedError` (a ``ValueError``) for
    a month that begins after ``now``.

    All queries run in one read transaction (unless the caller already holds
    one), so a report made while the daemon writes is one consistent snapshot
    of the store: its totals, days and events agree with each other.
    """
    check_started(month(period, config.site.tz), now)  # validate before touching the store
    reader = Reader(store)
    if store.conn.in_transaction:
        return _build(reader, config, period, now)
    with snapshot(store.conn):
        return _build(reader, config, period, now)


def _build(reader: Reader, config: Config, period: str, now: float) -> dict[str, Any]:
    site = config.site
    tz = site.tz
    pb = month(period, tz)
    days = [d.isoformat() for d in pb.days]
    energy = _Energy(reader.daily(pb.first_day, pb.last_day))
    meters = _meters(reader, config, pb, energy.meters)
    assess_end = min(pb.end_ts, max(now, pb.start_ts))
    assessed_s = assess_end - pb.start_ts
    first_reading = reader.first_reading()
    monitored_all_month = first_reading is not None and first_reading <= pb.start_ts

    # ---- gaps and anomalies (rows of the month; a gap counts if it overlaps it)
    gaps: list[dict[str, Any]] = []
    unbounded: dict[str, int] = {}
    gap_count: dict[str, int] = {}
    for gid, meter, g0, g1, upper, reason in reader.gaps(pb.start_ts, pb.end_ts):
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
    for aid, meter, ts, kind, value, detail in reader.anomalies(pb.start_ts, pb.end_ts):
        per = anomaly_counts.setdefault(meter, {})
        per[kind] = per.get(kind, 0) + 1
        if kind not in UNLISTED_ANOMALIES:
            anomaly_items.append({"id": aid, "meter": meter, "at": rfc3339_or_none(ts),
                                  "kind": kind, "value": value, "detail": detail})
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
            "configured": m.configured is not None,
            **_passport(m.configured, pb),
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
    for name, gids in sorted(groups.items()):
        kwh, gap_kwh = energy.total(gids), energy.total(gids, gaps=True)
        group_rows.append({"group": name, "meters": gids, "accounted_kwh": _kwh(kwh),
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
    peak_kw, peak_at = reader.peak_15min(ids, pb.start_ts, pb.end_ts)

    # ---- events, alerts, orders, dead letters
    events: list[dict[str, Any]] = []
    event_counts: dict[str, int] = {}
    alerts: list[dict[str, Any]] = []
    for row in reader.events(pb.start_ts, pb.end_ts):
        kind, severity, body = row[1], row[2], _json_obj(row[6])
        item = _event_item(row, body)
        events.append(item)
        event_counts[kind] = event_counts.get(kind, 0) + 1
        if kind in ALERT_KINDS and not _label_other_month(str(body.get("period") or ""), pb):
            alerts.append({**item, "state": _event_state(kind, severity, body),
                           "after_period_end": False})
    # The alert machine closes a calendar period's alert at the first check of the
    # next period, labelled with the old period: that event is this month's outcome.
    for row in reader.resolved_since(pb.end_ts):
        body = _json_obj(row[6])
        if _label_in_month(str(body.get("period") or ""), pb):
            alerts.append({**_event_item(row, body),
                           "state": "ok", "after_period_end": True})
    # State at the start: the last alert event before it, unless that event's
    # calendar period ended before this month began (a new period starts at ok).
    at_start: dict[tuple[str, str], str] = {}
    for rule, scope, kind, severity, body_text in reader.last_alerts_before(pb.start_ts):
        body = _json_obj(body_text)
        carried = _label_covers(str(body.get("period") or ""), pb.first_day)
        at_start[(rule, scope)] = _event_state(kind, severity, body) if carried else "ok"
    state_now: dict[tuple[str, str], dict[str, Any]] = {}
    for rule, scope, state, level, since, period_label, data in reader.alert_state():
        sd = _json_obj(data)
        state_now[(rule, scope)] = {
            "scope": scope, "state": state, "level": level, "since": rfc3339_or_none(since),
            "period": period_label, "value": _num(sd.get("value")),
            "limit": _num(sd.get("limit")), "unit": sd.get("unit")}

    ctx = _Context(config, pb, reader, meters, energy, alerts, at_start, state_now)
    rules = [_rule_entry(r, ctx) for r in config.rules]

    orders: list[dict[str, Any]] = []
    order_counts: dict[str, int] = {}
    for o in reader.orders(pb.start_ts, pb.end_ts):
        try:
            order_meters = json.loads(o[4] or "[]")
        except ValueError:
            order_meters = [o[4]]
        orders.append({
            "order_id": o[0], "action": o[1], "scope": o[2], "rule": o[3],
            "meters": order_meters if isinstance(order_meters, list) else [order_meters],
            "target_kw": o[5], "reason": o[6], "issued_at": rfc3339_or_none(o[7]),
            "outcome": o[8], "resends": o[9], "updated_at": rfc3339_or_none(o[10]),
            "actor": o[11], "dry_run": bool(o[12]),
        })
        order_counts[o[8]] = order_counts.get(o[8], 0) + 1

    dead_by_reason = reader.dead_letters(pb.start_ts, pb.end_ts)

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
            "owner": site.owner, "inn": site.inn, "address": site.address,
            "supply_contract": site.supply_contract, "supply_point": site.supply_point,
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
            "ended": now >= pb.end_ts,
            "monitoring_since": rfc3339_or_none(first_reading),
            "monitored_from_start": monitored_all_month,
            "complete": now >= pb.end_ts and monitored_all_month,
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
        "chart": _chart(config, pb, energy, ids, assess_end),
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
        "audit": reader.audit(pb.start_ts, pb.end_ts),
    }
    report["sha256"] = content_sha256(report)
    return report
