"""The one retry policy of everything that leaves the gateway (InfluxDB, webhooks).

- :class:`Backoff`: exponential delay ``base_s * 2**(attempt-1)``, capped at
  ``cap_s``, with *equal jitter* (half of it fixed, half random), so that many
  gateways retrying after one outage spread out but never retry at once.
- :func:`retry_after_s`: a server's ``Retry-After`` (RFC 9110 §10.2.3), as
  seconds from ``now``.  Accepted: delay-seconds written as a plain decimal
  (``120``; ``1.5`` is accepted too, as several servers send it) and an
  HTTP-date, which is always UTC (a date without a zone is read as UTC, as the
  RFC defines HTTP-dates in GMT).  Refused (``None``: the caller falls back
  to its own backoff): signs, exponents (``1e3``), ``inf``/``nan``, anything
  else.  The result is at least :data:`RETRY_AFTER_MIN_S` (a ``0`` or a date in
  the past must not make a tight loop) and at most ``cap_s``.
Pure: no I/O; the caller passes ``now`` and the random number.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from dataclasses import dataclass

#: a Retry-After beyond this is read as this (an hour)
RETRY_AFTER_CAP_S = 3600.0
#: a Retry-After below this (0, a date in the past) is read as this
RETRY_AFTER_MIN_S = 1.0
_DELAY_SECONDS = re.compile(r"^[0-9]+(\.[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter."""

    base_s: float
    cap_s: float

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and self.cap_s >= self.base_s):
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got {self.base_s}, "
                             f"{self.cap_s}")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay after the ``attempt``-th failure (1 = the first)."""
        return min(self.cap_s, self.base_s * 2.0 ** min(max(attempt, 1) - 1, 60))

    def delay(self, attempt: int, rnd: float) -> float:
        """The delay after the ``attempt``-th failure; ``rnd`` is uniform in [0, 1)."""
        d = self.ceiling(attempt)
        return d / 2 + min(max(rnd, 0.0), 1.0) * d / 2


def retry_after_s(value: str | None, now: float, cap_s: float = RETRY_AFTER_CAP_S
                  ) -> float | None:
    """``Retry-After`` as seconds from ``now``; ``None`` when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if _DELAY_SECONDS.match(text):
        return min(max(float(text), RETRY_AFTER_MIN_S), cap_s)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(max(when.timestamp() - now, RETRY_AFTER_MIN_S), cap_s)
