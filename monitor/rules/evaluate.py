"""Rule evaluation: a snapshot of the site in, one verdict per (rule, scope) out.

Everything here is pure: the clock (``Snapshot.now``), the totals and the
curtailment signals are values the caller puts into a :class:`Snapshot`; no
function reads the clock, the database, the environment or the network.  That
is what makes month ends, DST changes and ban windows testable.

The caller (the scheduler's check job) does, once per check:

1. ``windows_needed(rules)`` and ``periods_needed(rules)`` tell it which
   totals to query;
2. build a :class:`Snapshot` from the store (see the field comments);
3. ``evaluate_all(rules, snap)`` -> verdicts, then hand each verdict to
   :func:`monitor.rules.alerts.step` together with the stored alert state.

Scopes: ``site`` = every meter (for energy: every meter that has energy in the
mapping, so a meter removed from the config still counts), ``group:NAME`` =
the meters whose ``group`` is NAME, ``meter:ID`` = that meter.

Time: Unix seconds (UTC floats).  Calendar periods and ban-window dates are in
the site's time zone; a local midnight is resolved with :mod:`zoneinfo`, so
days of 23 or 25 hours are handled.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from typing import Any
from zoneinfo import ZoneInfo

from monitor.config import (
    BanWindowRule,
    CurtailmentRule,
    EnergyCapRule,
    PowerCapRule,
    ReconcileRule,
    SiteConfig,
    StaleDataRule,
)
from monitor.core.accounting import MWH_PER_KWH
from monitor.core.periods import DAY, local_midnight, period_bounds
from monitor.core.signal import Signal
from monitor.core.timefmt import local_iso, rfc3339
from monitor.core.verdict import State, Verdict

AnyRule = (
    EnergyCapRule | PowerCapRule | BanWindowRule | StaleDataRule | CurtailmentRule | ReconcileRule
)

#: the run-rate window for energy-cap projections (the snapshot must hold it)
RUN_RATE_WINDOW_S = 3600.0
#: reconcile compares nothing while the main meter averages less than this
RECONCILE_MIN_MAIN_KW = 0.5
#: how many meter names a message lists before it says "+N more"
MAX_LISTED = 10

_PERIOD_WORD = {"calendar_day": "daily", "calendar_month": "monthly", "calendar_year": "yearly"}


class SnapshotError(ValueError):
    """The snapshot lacks data a rule needs (a bug in the snapshot builder, never user data)."""


# --------------------------------------------------------------------------- values in


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    """One meter as the rules see it.

    ``last_seen`` is the time of its last reading (``None``: never seen);
    ``online`` is False after its last will said offline; ``power_w`` is its
    latest power (``None``: unknown or stale); ``expected_interval_s`` how often
    it normally reports (the meter's own setting, else the intake default);
    ``first_seen`` the time of its first reading ever (``None``: never seen, or
    not known to the caller), which tells whether a window is full of data yet.
    """

    id: str
    group: str
    rated_kw: float | None
    last_seen: float | None
    online: bool
    power_w: float | None
    expected_interval_s: float
    first_seen: float | None = None


_new_object = object.__new__
# each slot's own setter: what the frozen dataclass's __init__ reaches through
# object.__setattr__, one lookup per field
(_set_id, _set_group, _set_rated, _set_last, _set_online, _set_power, _set_interval,
 _set_first) = (MeterSnapshot.__dict__[f].__set__ for f in MeterSnapshot.__slots__)


def meter_snapshot(id: str, group: str, rated_kw: float | None, last_seen: float | None,
                   online: bool, power_w: float | None, expected_interval_s: float,
                   first_seen: float | None) -> MeterSnapshot:
    """``MeterSnapshot(id, group, ...)``, equal to it, in about half the time: a check
    makes one for each of 10,000 meters (:func:`monitor.rules.check.build_snapshot`)."""
    m: MeterSnapshot = _new_object(MeterSnapshot)
    _set_id(m, id)
    _set_group(m, group)
    _set_rated(m, rated_kw)
    _set_last(m, last_seen)
    _set_online(m, online)
    _set_power(m, power_w)
    _set_interval(m, expected_interval_s)
    _set_first(m, first_seen)
    return m


@dataclass(frozen=True)
class Snapshot:
    """Everything the rules read, taken at one instant ``now``.

    Mappings from meter id to kWh may omit meters with nothing accounted (they
    count as 0).  ``period_kwh`` needs every period in :func:`periods_needed`,
    ``window_kwh`` every window in :func:`windows_needed`; a missing one
    raises :class:`SnapshotError`.  ``period_gap_kwh`` is needed for periods
    of ``conservative`` energy caps and is read as 0 elsewhere.
    """

    now: float  # Unix seconds
    site: SiteConfig
    meters: Mapping[str, MeterSnapshot]
    # period -> meter -> kWh accounted so far in the current period (site tz)
    period_kwh: Mapping[str, Mapping[str, float]]
    # same, upper bound of unaccounted data gaps in the current period
    period_gap_kwh: Mapping[str, Mapping[str, float]]
    # window_s -> meter -> kWh accounted in [now - window_s, now]
    window_kwh: Mapping[float, Mapping[str, float]]
    # curtailment topic -> latest signal
    signals: Mapping[str, Signal] = field(default_factory=dict)
    # window_s -> meter -> seconds of [now - window_s, now] that the meter's window_kwh
    # covers (see :func:`monitor.rules.check.build_snapshot`); a window or meter that
    # is absent counts as covering the whole window
    window_covered_s: Mapping[float, Mapping[str, float]] = field(default_factory=dict)

    @cached_property
    def index(self) -> ScopeIndex:
        """Scope membership and cached per-scope sums, built once per snapshot."""
        return ScopeIndex(self)


def _span(covered_s: float, window_s: float, min_cover_s: float) -> float:
    """The seconds a meter's window energy is divided by: the time its data covers
    (at most the window), or the whole window when that is nothing or less than
    ``min_cover_s``."""
    return covered_s if 0.0 < covered_s < window_s and covered_s >= min_cover_s else window_s


class ScopeIndex:
    """Scope membership and per-scope sums of one snapshot, computed lazily and once.

    Summing a mapping for any group costs one pass over the mapping for *all*
    groups together, so 50 group rules cost the same as one site rule.
    """

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.zone = ZoneInfo(snap.site.timezone)
        self.today = dt.datetime.fromtimestamp(snap.now, self.zone).date()
        groups: dict[str, list[str]] = {}
        group_of: dict[str, str] = {}
        for mid, m in snap.meters.items():
            groups.setdefault(m.group, []).append(mid)
            group_of[mid] = m.group
        self.group_of = group_of
        self.all_meters: tuple[str, ...] = tuple(sorted(snap.meters))
        self.groups: dict[str, tuple[str, ...]] = {g: tuple(sorted(v)) for g, v in groups.items()}
        # id(mapping) -> (mapping kept alive, site total, group totals)
        self._sums: dict[int, tuple[Mapping[str, float], float, dict[str, float]]] = {}
        self._sets: dict[str, frozenset[str]] = {}
        self._power: tuple[float | None, dict[str, float]] | None = None
        self._periods: dict[str, tuple[float, float, str]] = {}
        # (window_s, min_cover) -> meter -> kW over the time its data covers
        self._rates: dict[tuple[float, float], dict[str, float]] = {}
        # window_s -> (site, group -> earliest first_seen)
        self._first: tuple[float | None, dict[str, float]] | None = None

    def members(self, scope: str) -> tuple[str, ...]:
        kind, _, name = scope.partition(":")
        if kind == "site":
            return self.all_meters
        if kind == "group":
            return self.groups.get(name, ())
        return (name,)

    def member_set(self, scope: str) -> frozenset[str]:
        got = self._sets.get(scope)
        if got is None:
            got = self._sets[scope] = frozenset(self.members(scope))
        return got

    def covers(self, scope: str, meter: str) -> bool:
        return scope == "site" or meter in self.member_set(scope)

    def total(self, mapping: Mapping[str, float], scope: str) -> float:
        """Sum of ``mapping`` (meter -> value) over the meters of ``scope``."""
        kind, _, name = scope.partition(":")
        if kind == "meter":
            return float(mapping.get(name, 0.0))
        cached = self._sums.get(id(mapping))
        if cached is None:
            # summed as whole mWh (the ledger's unit), so the total does not depend on
            # the order of the meters and equals the report's sum of the same rows; a
            # zero adds nothing (most gap mappings are zeros), NaN still raises
            mwh = {mid: round(value * MWH_PER_KWH) for mid, value in mapping.items() if value}
            get, zero = mwh.get, repeat(0)
            by_group = {g: sum(map(get, members, zero)) / MWH_PER_KWH
                        for g, members in self.groups.items() if g}
            cached = (mapping, sum(mwh.values()) / MWH_PER_KWH, by_group)
            self._sums[id(mapping)] = cached
        return cached[1] if kind == "site" else cached[2].get(name, 0.0)

    def power_kw(self, scope: str) -> float | None:
        """Latest power of the scope in kW (unknown power left out; None: none known)."""
        kind, _, name = scope.partition(":")
        meters = self.snap.meters
        if kind == "meter":
            m = meters.get(name)
            return None if m is None or m.power_w is None else m.power_w / 1000.0
        if self._power is None:
            total: float | None = None
            by_group: dict[str, float] = {}
            for m in meters.values():
                if m.power_w is None:
                    continue
                total = (total or 0.0) + m.power_w
                by_group[m.group] = by_group.get(m.group, 0.0) + m.power_w
            self._power = (total, by_group)
        total_w, groups_w = self._power
        if kind == "site":
            return None if total_w is None else total_w / 1000.0
        got = groups_w.get(name)
        return None if got is None else got / 1000.0

    def rate_kw(self, window_s: float, scope: str, min_cover_s: float = 0.0) -> float:
        """The average power of ``scope`` in ``[now - window_s, now]``, in kW: each
        meter's window energy divided by the time its data covers
        (``Snapshot.window_covered_s``), summed.  A meter covering less than
        ``min_cover_s`` (or nothing) is divided by the whole window."""
        key = (window_s, min_cover_s)
        rates = self._rates.get(key)
        kind, _, name = scope.partition(":")
        if rates is None and kind != "site":
            # a group or a meter alone (a reconcile's scopes): its own meters only; the
            # same figures as the whole mapping's (rounded per meter as :meth:`total`)
            energy = _need_window(self.snap, window_s)
            covered = self.snap.window_covered_s.get(window_s, {})
            if kind == "meter":
                kwh = energy.get(name)
                return 0.0 if kwh is None else float(
                    kwh * 3600.0 / _span(covered.get(name, window_s), window_s, min_cover_s))
            mwh = 0
            for mid in self.groups.get(name, ()) if name else ():
                kwh = energy.get(mid)
                if kwh is not None:
                    mwh += round(kwh * 3600.0 / _span(covered.get(mid, window_s), window_s,
                                                      min_cover_s) * MWH_PER_KWH)
            return mwh / MWH_PER_KWH
        if rates is None:
            energy = _need_window(self.snap, window_s)
            cover = self.snap.window_covered_s.get(window_s, {}).get
            w, least = window_s, min_cover_s
            # _span() spelt out: this runs for every meter
            rates = {mid: kwh * 3600.0 / (c if 0.0 < (c := cover(mid, w)) < w and c >= least
                                          else w)
                     for mid, kwh in energy.items()}
            self._rates[key] = rates
        return self.total(rates, scope)

    def observed_s(self, window_s: float, scope: str) -> float:
        """How much of ``[now - window_s, now]`` the scope has been observed: from its
        meters' earliest first reading (``MeterSnapshot.first_seen``) to ``now``, at
        most the window.  A snapshot without first-seen times and without coverage
        of this window reads as full (callers that know nothing are not warming up)."""
        if self._first is None:
            site: float | None = None
            groups: dict[str, float] = {}
            for m in self.snap.meters.values():
                if m.first_seen is None:
                    continue
                site = m.first_seen if site is None else min(site, m.first_seen)
                g = groups.get(m.group)
                groups[m.group] = m.first_seen if g is None else min(g, m.first_seen)
            self._first = (site, groups)
        kind, _, name = scope.partition(":")
        if kind == "meter":
            one = self.snap.meters.get(name)
            first = None if one is None else one.first_seen
        elif kind == "group":
            first = self._first[1].get(name)
        else:
            first = self._first[0]
        if first is None:
            if self._first[0] is None and window_s not in self.snap.window_covered_s:
                return window_s
            return 0.0
        return max(0.0, min(window_s, self.snap.now - first))

    def period(self, period: str) -> tuple[float, float, str]:
        got = self._periods.get(period)
        if got is None:
            got = self._periods[period] = period_bounds(period, self.snap.now, self.zone)
        return got


# --------------------------------------------------------------------------- values out


# --------------------------------------------------------------------------- filters, periods


def _region_matches(wanted: Iterable[str], region: str) -> bool:
    """``RU-IRK`` matches ``RU-IRK``; a bare country code ``RU`` matches every ``RU-*``."""
    have = region.upper()
    for want in wanted:
        w = want.upper()
        if have == w or ("-" not in w and have.startswith(w + "-")):
            return True
    return False


def matches_site(rule: AnyRule, site: SiteConfig) -> bool:
    """The rule's site filters: categories, regions, subregions, exclude_subregions, off-grid.

    Empty filter lists match everything.  Categories and subregions compare
    case-insensitively.  A ban window with ``exempt_off_grid`` does not match an
    ``off_grid`` site (the March 2025 exemption for isolated own generation).
    """
    if rule.categories and site.category.casefold() not in {
        c.casefold() for c in rule.categories
    }:
        return False
    if rule.regions and not _region_matches(rule.regions, site.region):
        return False
    sub = site.subregion.casefold()
    if rule.subregions and sub not in {s.casefold() for s in rule.subregions}:
        return False
    if sub and sub in {s.casefold() for s in rule.exclude_subregions}:
        return False
    return not (isinstance(rule, BanWindowRule) and rule.exempt_off_grid and site.off_grid)


def in_effect(rule: AnyRule, day: dt.date) -> bool:
    """``effective_from`` <= day <= ``effective_until`` (both inclusive, both optional)."""
    if rule.effective_from is not None and day < rule.effective_from:
        return False
    return rule.effective_until is None or day <= rule.effective_until


def applies(rule: AnyRule, site: SiteConfig, day: dt.date) -> bool:
    """Whether ``rule`` governs ``site`` on the site-local date ``day``."""
    return matches_site(rule, site) and in_effect(rule, day)


def windows_needed(rules: Iterable[AnyRule]) -> set[float]:
    """The ``window_s`` keys the snapshot's ``window_kwh`` must hold for these rules."""
    out: set[float] = set()
    for r in rules:
        if isinstance(r, PowerCapRule | ReconcileRule):
            out.add(float(r.window_s))
        elif isinstance(r, EnergyCapRule):
            out.add(RUN_RATE_WINDOW_S)
    return out


def periods_needed(rules: Iterable[AnyRule]) -> set[str]:
    """The periods the snapshot's ``period_kwh`` (and ``period_gap_kwh``) must hold."""
    return {r.period for r in rules if isinstance(r, EnergyCapRule)}


# --------------------------------------------------------------------------- formatting


def human_duration(seconds: float) -> str:
    """``"2 d 3 h"``, ``"5 h 10 min"``, ``"42 min"``, ``"30 s"``."""
    s = max(0, round(seconds))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d} d {h} h" if h else f"{d} d"
    if h:
        return f"{h} h {m} min" if m else f"{h} h"
    if m:
        return f"{m} min"
    return f"{sec} s"


def _listing(names: Sequence[str], what: Mapping[str, str] | None = None) -> str:
    shown = [f"{n} ({what[n]})" if what and n in what else n for n in names[:MAX_LISTED]]
    more = len(names) - MAX_LISTED
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


#: a message's figures step by at most this fraction of their reference (the limit)
FIGURE_STEP = 0.05
_MAX_DECIMALS = 6


def _decimals(ref: float | None) -> int:
    if ref is None or not math.isfinite(ref) or ref == 0:
        return 1
    need = math.ceil(math.log10(1.0 / (FIGURE_STEP * abs(ref))) - 1e-9)
    own = f"{abs(ref):.{_MAX_DECIMALS}f}".rstrip("0").partition(".")[2]
    return min(_MAX_DECIMALS, max(1, need, len(own)))


def figure(x: float, ref: float | None = None, *, exact: bool = False) -> str:
    """``x`` with as many decimals as its reference ``ref`` (usually the limit) needs:
    steps of at most 5% of ``ref``, at least one decimal, and never fewer than ``ref``
    itself has.  ``exact`` is for a configured number (a limit): whole numbers are
    written without decimals.  Every message of the rules writes its figures with
    this, so "0.27 of 0.30 kWh" and "4812.0 of 6000 kWh" come from the same rule.

    >>> figure(0.27, 0.3), figure(0.3, 0.3, exact=True), figure(6000, 6000, exact=True)
    ('0.27', '0.30', '6000')
    """
    if exact and float(x).is_integer() and abs(x) < 1e15:
        return f"{x:.0f}"
    return f"{x:.{_decimals(x if ref is None else ref)}f}"


def _span_note(observed_s: float, window_s: float) -> str:
    """``"warming up: 2 min of 1 h observed"`` (the label of a window not yet full)."""
    seen = "no data yet" if observed_s <= 0 else f"{human_duration(observed_s)} of " \
        f"{human_duration(window_s)} observed"
    return f"warming up: {seen}"


# --------------------------------------------------------------------------- evaluation


def _need_period(snap: Snapshot, period: str) -> Mapping[str, float]:
    got = snap.period_kwh.get(period)
    if got is None:
        raise SnapshotError(f"snapshot.period_kwh lacks period {period!r}")
    return got


def _need_window(snap: Snapshot, window_s: float) -> Mapping[str, float]:
    got = snap.window_kwh.get(window_s)
    if got is None:
        raise SnapshotError(f"snapshot.window_kwh lacks window {window_s:g} s")
    return got


def _level(ratio: float, warn_at: Sequence[float]) -> float:
    level = 0.0
    for w in warn_at:
        if ratio >= w:
            level = max(level, w)
    return level


def _energy_cap(rule: EnergyCapRule, snap: Snapshot) -> Verdict:
    idx = snap.index
    now = snap.now
    start, end, label = idx.period(rule.period)
    accounted = idx.total(_need_period(snap, rule.period), rule.scope)
    gaps_by_meter = snap.period_gap_kwh.get(rule.period)
    if gaps_by_meter is None:
        if rule.conservative:
            raise SnapshotError(f"snapshot.period_gap_kwh lacks period {rule.period!r}")
        gaps_by_meter = {}
    gap = idx.total(gaps_by_meter, rule.scope)
    value = accounted + gap if rule.conservative else accounted
    limit = rule.limit_kwh
    # the run rate: the last hour's energy over the time its data covers, so that a
    # meter that has reported for two minutes projects its real power, not 1/30 of it
    rate_kw = idx.rate_kw(RUN_RATE_WINDOW_S, rule.scope)
    observed = idx.observed_s(RUN_RATE_WINDOW_S, rule.scope)
    warming = observed < RUN_RATE_WINDOW_S
    warm_note = f" ({_span_note(observed, RUN_RATE_WINDOW_S)} for the run rate)" if warming \
        else ""
    left_s = max(0.0, end - now)
    projected = value + rate_kw * left_s / 3600.0
    ratio = value / limit
    remaining = max(0.0, limit - value)
    target_kw = remaining * 3600.0 / left_s if left_s > 0 else 0.0
    word = _PERIOD_WORD[rule.period]
    gap_note = (f" (incl. up to {figure(gap, limit)} kWh of data gaps)"
                if rule.conservative and gap else "")
    of_limit = f"{figure(value, limit)} of {figure(limit, limit, exact=True)} kWh"
    state: State
    if value >= limit:
        state, level, to_limit = "breach", 1.0, 0.0
        target_kw = 0.0
        message = (
            f"{word} limit reached: {of_limit} in {label}{gap_note}"
        )
    else:
        level = _level(ratio, rule.warn_at)
        state = "warning" if level > 0 else "ok"
        to_limit = remaining * 3600.0 / rate_kw if rate_kw > 0 else math.inf
        pct = math.floor(ratio * 100)
        message = (
            f"{pct}% of the {word} limit used: {of_limit}{gap_note}; "
            f"projected {figure(projected, limit)} kWh by the end of {label}{warm_note}"
        )
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=rule.scope,
        state=state,
        level=level,
        value=value,
        limit=limit,
        unit="kWh",
        ratio=ratio,
        projected=projected,
        seconds_to_limit=None if math.isinf(to_limit) else to_limit,
        period=label,
        message=message,
        meters=idx.members(rule.scope),
        target_kw=target_kw,
        detail={
            "accounted_kwh": accounted,
            "gap_kwh": gap,
            "conservative": rule.conservative,
            "run_rate_kw": rate_kw,
            "run_rate_window_s": RUN_RATE_WINDOW_S,
            "observed_s": observed,
            "warming_up": warming,
            "period_start": start,
            "period_end": end,
            "seconds_left": left_s,
        },
    )


def _power_cap(rule: PowerCapRule, snap: Snapshot) -> Verdict:
    idx = snap.index
    window_s = float(rule.window_s)
    # the average over the time the data covers: right from the first minute, and not
    # a third low when the last reporting interval of the window has no reading yet
    avg_kw = idx.rate_kw(window_s, rule.scope)
    observed = idx.observed_s(window_s, rule.scope)
    warming = observed < window_s
    limit = rule.limit_kw
    ratio = avg_kw / limit
    window = human_duration(rule.window_s)
    over = f"over {window}" + (f" ({_span_note(observed, window_s)})" if warming else "")
    avg = figure(avg_kw, limit)
    lim = figure(limit, limit, exact=True)
    state: State
    if ratio >= 1.0:
        state, level = "breach", 1.0
        message = f"average {avg} kW {over} is at or above the limit {lim} kW"
    else:
        level = _level(ratio, rule.warn_at)
        state = "warning" if level > 0 else "ok"
        message = f"average {avg} kW {over}: {math.floor(ratio * 100)}% of the limit {lim} kW"
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=rule.scope,
        state=state,
        level=level,
        value=avg_kw,
        limit=limit,
        unit="kW",
        ratio=ratio,
        message=message,
        meters=idx.members(rule.scope),
        # ordering the scope to exactly the limit would never let the breach clear
        target_kw=limit * rule.clear_below,
        detail={"window_s": rule.window_s, "clear_below": rule.clear_below, "hold_s": rule.hold_s,
                "observed_s": observed, "warming_up": warming},
    )


def _resolve_mmdd(mmdd: str, year: int, *, is_start: bool) -> dt.date:
    """MM-DD in ``year``; 02-29 of a non-leap year is 03-01 as a start, 02-28 as an end."""
    month, day = int(mmdd[:2]), int(mmdd[3:])
    try:
        return dt.date(year, month, day)
    except ValueError:  # only 02-29 passes config validation and fails here
        return dt.date(year, 3, 1) if is_start else dt.date(year, 2, 28)


@dataclass(frozen=True, slots=True)
class BanSpan:
    """One concrete ban window: site-local dates, both inclusive."""

    first: dt.date
    last: dt.date
    source: str  # "dates 2025-01-01..2031-03-15" or "yearly 11-15..03-15"

    @property
    def label(self) -> str:
        return f"{self.first.isoformat()}..{self.last.isoformat()}"


def ban_spans(rule: BanWindowRule, around: dt.date) -> list[BanSpan]:
    """The concrete windows of ``rule`` near ``around`` (from the year before to the
    year after), clipped to ``effective_from``/``effective_until``, sorted, and with
    overlapping or adjacent windows merged (so "until when" is the real end)."""
    raw: list[BanSpan] = [
        BanSpan(r.from_, r.until, f"dates {r.from_.isoformat()}..{r.until.isoformat()}")
        for r in rule.dates
    ]
    if rule.yearly is not None:
        y = rule.yearly
        crosses = y.end < y.start  # MM-DD strings compare like dates within a year
        desc = f"yearly {y.start}..{y.end}"
        for year in (around.year - 1, around.year, around.year + 1):
            first = _resolve_mmdd(y.start, year, is_start=True)
            last = _resolve_mmdd(y.end, year + 1 if crosses else year, is_start=False)
            if first <= last:
                raw.append(BanSpan(first, last, desc))
    clipped: list[BanSpan] = []
    for s in raw:
        first = max(s.first, rule.effective_from) if rule.effective_from else s.first
        last = min(s.last, rule.effective_until) if rule.effective_until else s.last
        if first <= last:
            clipped.append(BanSpan(first, last, s.source))
    clipped.sort(key=lambda s: (s.first, s.last))
    merged: list[BanSpan] = []
    for s in clipped:
        if merged and s.first <= merged[-1].last + DAY:
            prev = merged[-1]
            sources = prev.source if s.source in prev.source.split(" + ") else (
                f"{prev.source} + {s.source}"
            )
            merged[-1] = BanSpan(prev.first, max(prev.last, s.last), sources)
        else:
            merged.append(s)
    return merged


def _ban_window(rule: BanWindowRule, snap: Snapshot) -> Verdict:
    idx = snap.index
    zone, today, now = idx.zone, idx.today, snap.now
    spans = ban_spans(rule, today)
    active = next((s for s in spans if s.first <= today <= s.last), None)
    upcoming = next((s for s in spans if s.first > today), None)
    power = idx.power_kw(rule.scope)
    tz = snap.site.timezone
    state: State = "ok"
    limit: float | None = None
    to_limit: float | None = None
    target: float | None = None
    detail: dict[str, Any] = {}
    if active is not None:
        ends_at = local_midnight(active.last + DAY, zone)
        state, limit, target, span = "breach", 0.0, 0.0, active
        message = (
            f"mining is banned here ({active.source}) until {active.last.isoformat()} "
            f"inclusive (ends {local_iso(ends_at, zone, 'minutes')} {tz}, "
            f"in {human_duration(ends_at - now)})"
        )
        detail = {"ends_at": ends_at}
    elif upcoming is not None and (
        local_midnight(upcoming.first, zone) - now <= rule.lead_time_s
    ):
        starts_at = local_midnight(upcoming.first, zone)
        state, span, to_limit = "warning", upcoming, starts_at - now
        message = (
            f"mining ban ({upcoming.source}) starts {local_iso(starts_at, zone, 'minutes')} {tz}, "
            f"in {human_duration(starts_at - now)}, and lasts until "
            f"{upcoming.last.isoformat()} inclusive"
        )
        detail = {"starts_at": starts_at}
    else:
        span = None
        message = "no ban in force" + (
            f"; next {upcoming.label} ({upcoming.source})" if upcoming is not None else ""
        )
    if span is not None:
        detail.update(first_day=span.first.isoformat(), last_day=span.last.isoformat(),
                      source=span.source)
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=rule.scope,
        state=state,
        level=1.0 if state == "breach" else 0.0,
        value=power,
        limit=limit,
        unit="kW",
        seconds_to_limit=to_limit,
        period=span.label if span is not None else "",
        message=message,
        meters=idx.members(rule.scope),
        target_kw=target,
        detail=detail,
    )


def _stale_data(rule: StaleDataRule, snap: Snapshot, caps: Sequence[Verdict]) -> Verdict:
    idx = snap.index
    now = snap.now
    members = idx.members(rule.scope)
    meters = snap.meters
    stale: dict[str, float | None] = {}
    offline: list[str] = []
    for mid in members:
        m = meters.get(mid)
        if m is None or m.last_seen is None:
            stale[mid] = None
            if m is not None and not m.online:
                offline.append(mid)
            continue
        silence = now - m.last_seen
        if not m.online:
            stale[mid] = silence
            offline.append(mid)
        elif silence > max(rule.max_silence_s, m.expected_interval_s):
            stale[mid] = silence
    silences = [s for s in stale.values() if s is not None]
    value = max(silences) if silences else None
    state: State = "ok"
    failsafe: str | None = None
    if not stale:
        message = f"all {len(members)} meters in {rule.scope} are reporting"
    else:
        off = set(offline)
        what = {
            mid: "offline" if mid in off else ("never seen" if s is None else
                                               f"silent {human_duration(s)}")
            for mid, s in stale.items()
        }
        names = sorted(stale)
        state = "warning"
        message = f"{len(names)} of {len(members)} meters not reporting: {_listing(names, what)}"
        if rule.failsafe_margin > 0:
            for cap in caps:
                if cap.ratio is None or cap.ratio < 1.0 - rule.failsafe_margin:
                    continue
                hit = [mid for mid in names if idx.covers(cap.scope, mid)]
                if hit:
                    failsafe = cap.rule
                    state = "breach"
                    message = (
                        f"fail-safe: {cap.rule} is at {math.floor(cap.ratio * 100)}% of its "
                        f"limit ({cap.scope}) while {len(hit)} of its meters are not reporting: "
                        f"{_listing(hit, what)}"
                    )
                    break
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=rule.scope,
        state=state,
        level=1.0 if state == "breach" else 0.0,
        value=value,
        limit=rule.max_silence_s,
        unit="s",
        message=message,
        meters=members,
        target_kw=0.0 if state == "breach" else None,
        detail={"stale": stale, "offline": tuple(offline), "failsafe": failsafe},
    )


def _curtailment(rule: CurtailmentRule, snap: Snapshot) -> Verdict:
    idx = snap.index
    sig = snap.signals.get(rule.topic)
    power = idx.power_kw(rule.scope)
    state: State = "ok"
    limit: float | None = None
    detail: dict[str, Any] = {"topic": rule.topic}
    if sig is not None:
        detail.update(until=sig.until, received_at=sig.received_at, target_kw=sig.target_kw)
    if sig is not None and sig.active(snap.now):
        state, limit = "breach", sig.target_kw
        message = (
            f"curtailment requested on {rule.topic}: at most "
            f"{figure(sig.target_kw, sig.target_kw, exact=True)} kW until "
            f"{rfc3339(sig.until)} (in {human_duration(sig.until - snap.now)})"
        )
    elif sig is not None:
        message = (
            f"no active curtailment on {rule.topic} (last request ended {rfc3339(sig.until)})"
        )
    else:
        message = f"no curtailment request received on {rule.topic}"
    ratio = power / limit if power is not None and limit else None
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=rule.scope,
        state=state,
        level=1.0 if state == "breach" else 0.0,
        value=power,
        limit=limit,
        unit="kW",
        ratio=ratio,
        message=message,
        meters=idx.members(rule.scope),
        target_kw=limit,
        detail=detail,
    )


def _reconcile(rule: ReconcileRule, snap: Snapshot) -> Verdict:
    idx = snap.index
    window_s = float(rule.window_s)
    # energy as if over the whole window: a meter covering at least half of it is
    # scaled from the time its data covers (its last reporting interval has no reading
    # yet), so a main meter at a 300 s interval is not compared a third low
    main = idx.rate_kw(window_s, rule.main, window_s / 2) * window_s / 3600.0
    parts = idx.rate_kw(window_s, rule.parts, window_s / 2) * window_s / 3600.0
    floor_kwh = RECONCILE_MIN_MAIN_KW * rule.window_s / 3600.0
    span = human_duration(rule.window_s)
    members = tuple(dict.fromkeys((*idx.members(rule.main), *idx.members(rule.parts))))
    detail: dict[str, Any] = {"main_kwh": main, "parts_kwh": parts, "window_s": rule.window_s}
    state: State = "ok"
    value: float | None = None
    ratio: float | None = None
    if main < floor_kwh:
        detail["skipped"] = True
        message = (
            f"not compared: {rule.main} used {figure(main, floor_kwh)} kWh over {span}, "
            f"below the {figure(RECONCILE_MIN_MAIN_KW, RECONCILE_MIN_MAIN_KW, exact=True)} kW "
            "average needed for a meaningful comparison"
        )
    else:
        value = abs(main - parts) / main
        ratio = value / rule.tolerance
        state = "breach" if value > rule.tolerance else "ok"
        message = (
            f"{rule.main} {figure(main, main)} kWh vs {rule.parts} {figure(parts, main)} kWh "
            f"over {span}: "
            f"{value:.1%} apart (tolerance {rule.tolerance:.1%})"
        )
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=rule.main,
        state=state,
        level=1.0 if state == "breach" else 0.0,
        value=value,
        limit=rule.tolerance,
        unit="fraction",
        ratio=ratio,
        message=message,
        meters=members,
        detail=detail,
    )


def evaluate(rule: AnyRule, snap: Snapshot, *, caps: Sequence[Verdict] = ()) -> list[Verdict]:
    """The verdicts of one rule (one per scope; every kind has one scope today).

    Does not check :func:`applies`; :func:`evaluate_all` does.  ``caps`` are the
    energy-cap verdicts a ``stale_data`` rule's fail-safe looks at.
    """
    if isinstance(rule, EnergyCapRule):
        return [_energy_cap(rule, snap)]
    if isinstance(rule, PowerCapRule):
        return [_power_cap(rule, snap)]
    if isinstance(rule, BanWindowRule):
        return [_ban_window(rule, snap)]
    if isinstance(rule, StaleDataRule):
        return [_stale_data(rule, snap, caps)]
    if isinstance(rule, CurtailmentRule):
        return [_curtailment(rule, snap)]
    return [_reconcile(rule, snap)]


def _not_in_effect(rule: AnyRule, snap: Snapshot) -> Verdict:
    idx = snap.index
    scope = rule.main if isinstance(rule, ReconcileRule) else rule.scope
    since = rule.effective_from.isoformat() if rule.effective_from else ""
    until = rule.effective_until.isoformat() if rule.effective_until else ""
    return Verdict(
        rule=rule.id,
        kind=rule.kind,
        scope=scope,
        state="ok",
        message=f"not in effect on {idx.today.isoformat()} (effective {since}..{until})",
        meters=idx.members(scope),
        detail={"in_effect": False},
    )


def evaluate_all(rules: Sequence[AnyRule], snap: Snapshot) -> list[Verdict]:
    """Verdicts of every rule that matches the site, in the order of ``rules``.

    Rules whose site filters do not match (another region, category, an
    exempt off-grid site) give no verdict at all.  Rules that match but are not
    in effect today give an ``ok`` verdict saying so (so an alert raised while
    they were in effect resolves); ban windows handle their effective dates
    themselves, so a lead-time warning can precede ``effective_from``.  Energy
    caps run first because ``stale_data`` fail-safes read their ratios.
    """
    today = snap.index.today
    matching = [r for r in rules if matches_site(r, snap.site)]
    done: dict[int, list[Verdict]] = {}
    caps: list[Verdict] = []
    for i, r in enumerate(matching):
        if isinstance(r, EnergyCapRule):
            done[i] = evaluate(r, snap) if in_effect(r, today) else [_not_in_effect(r, snap)]
            caps.extend(v for v in done[i] if v.ratio is not None)
    out: list[Verdict] = []
    for i, r in enumerate(matching):
        if i in done:
            out.extend(done[i])
        elif isinstance(r, BanWindowRule) or in_effect(r, today):
            out.extend(evaluate(r, snap, caps=caps))
        else:
            out.append(_not_in_effect(r, snap))
    return out
