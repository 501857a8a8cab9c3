"""Writing and reading instants: the one RFC 3339 implementation of the daemon.

Every time the daemon writes for a machine (webhook bodies, order messages,
``status --json``, reports, audit entries) is :func:`rfc3339`: UTC with ``Z``,
whole seconds when the instant is whole, otherwise milliseconds
(``2026-11-27T02:00:00Z``, ``2026-11-27T02:00:00.500Z``).  Times written for a
person are :func:`local_iso` in the site's zone.  Every time the daemon reads
is :func:`parse_rfc3339`, which insists on an offset: a time without one is
ambiguous, and an energy ledger must not guess.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
import math


def rfc3339(ts: float) -> str:
    """Unix seconds as ``2026-11-27T02:00:00Z`` (milliseconds only when not whole)."""
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    spec = "seconds" if when.microsecond == 0 else "milliseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


def rfc3339_or_none(ts: float | None) -> str | None:
    """:func:`rfc3339`, with ``None`` passed through."""
    return None if ts is None else rfc3339(ts)


def local_iso(ts: float, tz: dt.tzinfo, timespec: str = "seconds") -> str:
    """``ts`` in the zone ``tz`` with its offset, e.g. ``2026-11-27T10:00:00+08:00``."""
    return dt.datetime.fromtimestamp(ts, tz).isoformat(timespec=timespec)


def parse_rfc3339(text: str) -> float:
    """Unix seconds of an RFC 3339 / ISO 8601 time that carries an offset (``Z`` or
    ``+03:00``; ``t``/``z`` in lower case are accepted as RFC 3339 allows).

    Raises :class:`ValueError` saying what is wrong: not a time, or no offset.
    """
    if not isinstance(text, str):
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    try:
        when = dt.datetime.fromisoformat(text.strip().upper())
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 time: {text!r}") from exc
    if when.tzinfo is None:
        raise ValueError(f"RFC 3339 time needs an offset (Z or +03:00): {text!r}")
    ts = when.timestamp()
    if not math.isfinite(ts):
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    return ts
