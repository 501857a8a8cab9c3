"""Calendar periods in the site's zone: the one definition of which instants belong
to a day, a month or a year.

The check, the status page and the report all ask this module, so they can never
disagree on which kWh belong to a month.  A period is the half-open interval
``[start_ts, end_ts)`` between two local midnights; DST is handled by the zone
(a skipped midnight begins the day at the transition instant, a repeated one at
its first occurrence).  Pure: no I/O, no clock (``now`` is always passed in).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo

DAY = dt.timedelta(days=1)
PERIODS = ("calendar_day", "calendar_month", "calendar_year")
_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")


def zone(tz: str | dt.tzinfo) -> dt.tzinfo:
    """A tzinfo from a zone name or a tzinfo."""
    return ZoneInfo(tz) if isinstance(tz, str) else tz


def local_midnight(day: dt.date, tz: str | dt.tzinfo) -> float:
    """The instant the site-local ``day`` begins (DST-correct; a skipped midnight
    resolves to the transition instant, a repeated one to its first occurrence)."""
    return dt.datetime(day.year, day.month, day.day, tzinfo=zone(tz)).timestamp()


def local_date(ts: float, tz: str | dt.tzinfo) -> dt.date:
    """The site-local calendar day that contains the instant ``ts``."""
    return dt.datetime.fromtimestamp(ts, zone(tz)).date()


def next_month(first: dt.date) -> dt.date:
    """The first day of the month after the one ``first`` is in."""
    return dt.date(first.year + (first.month == 12), first.month % 12 + 1, 1)


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar period in a zone: ``[start_ts, end_ts)`` and its local days."""

    kind: str
    label: str
    tz: dt.tzinfo
    first_day: dt.date
    last_day: dt.date
    start_ts: float
    end_ts: float

    @property
    def seconds(self) -> float:
        return self.end_ts - self.start_ts

    @property
    def days(self) -> list[dt.date]:
        n = (self.last_day - self.first_day).days + 1
        return [self.first_day + dt.timedelta(days=i) for i in range(n)]

    def contains(self, ts: float) -> bool:
        return self.start_ts <= ts < self.end_ts


def _period(kind: str, first: dt.date, end: dt.date, label: str, tz: dt.tzinfo) -> Period:
    return Period(kind, label, tz, first, end - DAY, local_midnight(first, tz),
                  local_midnight(end, tz), )


def period_of(kind: str, ts: float, tz: str | dt.tzinfo) -> Period:
    """The calendar period of ``kind`` (one of :data:`PERIODS`) that contains ``ts``.

    Labels: ``"2026-11-27"`` (calendar_day), ``"2026-11"`` (calendar_month),
    ``"2026"`` (calendar_year).
    """
    z = zone(tz)
    d = local_date(ts, z)
    if kind == "calendar_day":
        return _period(kind, d, d + DAY, d.isoformat(), z)
    if kind == "calendar_month":
        first = d.replace(day=1)
        return _period(kind, first, next_month(first), f"{d.year:04d}-{d.month:02d}", z)
    if kind == "calendar_year":
        return _period(kind, dt.date(d.year, 1, 1), dt.date(d.year + 1, 1, 1),
                       f"{d.year:04d}", z)
    raise ValueError(f"unknown period {kind!r}")


def period_bounds(kind: str, ts: float, tz: str | dt.tzinfo) -> tuple[float, float, str]:
    """``(start_ts, end_ts, label)`` of :func:`period_of`."""
    p = period_of(kind, ts, tz)
    return p.start_ts, p.end_ts, p.label


def parse_month(label: str) -> tuple[int, int]:
    """``"2026-11"`` -> ``(2026, 11)``.  Raises :class:`ValueError` with a clear message."""
    m = _MONTH_RE.match(label.strip()) if isinstance(label, str) else None
    if m is None:
        raise ValueError(f"period must be a calendar month written YYYY-MM (e.g. 2026-11), "
                         f"not {label!r}")
    year, month = int(m.group(1)), int(m.group(2))
    if not 1 <= month <= 12:
        raise ValueError(f"period {label!r} is not a calendar month YYYY-MM: "
                         "the month must be 01 to 12")
    if not 1970 <= year <= 9998:
        raise ValueError(f"period {label!r} is not a calendar month YYYY-MM: "
                         "the year must be 1970 to 9998")
    return year, month


def month(label: str, tz: str | dt.tzinfo) -> Period:
    """The calendar month labelled ``YYYY-MM`` in ``tz``.  Raises :class:`ValueError`."""
    year, mon = parse_month(label)
    first = dt.date(year, mon, 1)
    return _period("calendar_month", first, next_month(first), f"{year:04d}-{mon:02d}",
                   zone(tz))
