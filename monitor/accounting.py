"""Energy accounting per meter: readings in, exact increments, gaps and anomalies out.

Pure: nothing here reads the clock, the store or the network.  The intake
worker owns one :class:`MeterState` per meter and feeds it readings in arrival
order; :func:`apply` updates that state in place and returns what to record.

The rules, in the order they are checked:

* A cumulative counter (``energy_kwh``) is the source of truth when a meter has
  one.  The first value is a baseline (energy before the daemon knew the meter
  is not counted).  An increase is counted; any decrease larger than
  ``jitter_kwh`` starts a new counter cycle (reboot, ``EnergyTotal 0``) and the
  new value is counted from zero, never the negative difference; a smaller
  decrease is jitter and changes nothing.  A retained message whose counter is
  lower than what we hold is an old replay and is ignored.
* Energy larger than ``rated_kw`` x elapsed time (+25 % and 0.002 kWh of slack)
  is physically impossible for the meter: the increment is quarantined
  (recorded as an anomaly, not counted) and the baseline moves on.  The bound
  is cumulative from an anchor reading, not per increment: readings a broker
  queued while the daemon was down arrive milliseconds apart when it comes
  back, stamped on receipt, and only their sum can be judged against the time
  that really passed (since the anchor, which sits before the outage).  The
  anchor moves forward once it is ``ANCHOR_WINDOW_S`` old, to the reading
  before one that arrived at least ``ANCHOR_MIN_STEP_S`` after its predecessor
  -- never into such a burst.
* A meter without a counter has its power integrated with the trapezoid rule,
  but only across gaps up to ``max_gap_s``; a longer gap (or one that spans an
  ``offline`` last will, or ends in a retained replay) is recorded as a data gap
  with its upper bound ``rated_kw`` x duration for the rules to use.
* Readings not newer than the last applied one (same time, or out of order)
  add nothing: this, plus the intake's redelivery check, is what makes QoS 1
  duplicates harmless.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from zoneinfo import ZoneInfo

from monitor.model import Reading

BUCKET_S = 900  # ledger resolution; every real UTC offset is a multiple of 15 min
PLAUSIBILITY_SLACK = 1.25
PLAUSIBILITY_EPSILON_KWH = 0.002  # two digits of a 0.001 kWh counter (rounding)
ANCHOR_WINDOW_S = 3600.0
ANCHOR_MIN_STEP_S = 1.0


@dataclass(slots=True)
class MeterState:
    """What a meter's accounting must remember between readings (persisted as JSON)."""

    last_ts: float | None = None
    counter_kwh: float | None = None
    counter_ts: float | None = None
    power_w: float | None = None
    power_ts: float | None = None
    has_counter: bool = False
    offline_since: float | None = None
    anchor_ts: float | None = None  # plausibility anchor (see module docstring)
    anchor_kwh: float = 0.0  # energy counted since the anchor

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> MeterState:
        data = json.loads(text or "{}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True, slots=True)
class MeterParams:
    rated_kw: float | None = None
    max_gap_s: float = 900.0
    jitter_kwh: float = 0.002


@dataclass(frozen=True, slots=True)
class Increment:
    """``kwh`` consumed evenly over ``[start_ts, end_ts]`` (equal ends: an instant)."""

    start_ts: float
    end_ts: float
    kwh: float


@dataclass(frozen=True, slots=True)
class Gap:
    start_ts: float
    end_ts: float
    upper_kwh: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class Anomaly:
    ts: float
    kind: str  # reset | quarantine | jitter | out_of_order | stale_retained
    value: float | None
    detail: str = ""


@dataclass(slots=True)
class Outcome:
    delta_kwh: float = 0.0
    increments: list[Increment] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


def _upper(params: MeterParams, seconds: float) -> float | None:
    return None if params.rated_kw is None else params.rated_kw * seconds / 3600.0


def apply(state: MeterState, r: Reading, params: MeterParams, retained: bool = False) -> Outcome:
    """Account one reading; updates ``state`` in place.  Called by the intake worker only."""
    out = Outcome()
    if state.last_ts is not None and r.ts < state.last_ts:
        out.anomalies.append(Anomaly(r.ts, "out_of_order", r.energy_kwh, f"after {state.last_ts}"))
        out.flags.append("out_of_order")
        return out
    if r.energy_kwh is not None:
        _counter(state, r, r.energy_kwh, params, retained, out)
    elif r.power_w is not None and not state.has_counter:
        _integrate(state, r, r.power_w, params, retained, out)
    if r.power_w is not None:
        state.power_w = r.power_w
        state.power_ts = r.ts
    state.offline_since = None
    state.last_ts = r.ts
    return out


def _counter(
    state: MeterState, r: Reading, value: float, params: MeterParams, retained: bool, out: Outcome
) -> None:
    prev, prev_ts = state.counter_kwh, state.counter_ts
    state.has_counter = True
    if prev is None or prev_ts is None:
        state.counter_kwh, state.counter_ts = value, r.ts
        out.flags.append("baseline")
        return
    elapsed = r.ts - prev_ts
    diff = value - prev
    if diff < 0:
        if retained:
            out.anomalies.append(Anomaly(r.ts, "stale_retained", value, f"counter {prev}"))
            out.flags.append("stale_retained")
            return
        if -diff <= params.jitter_kwh:
            out.anomalies.append(Anomaly(r.ts, "jitter", diff, f"counter {prev} -> {value}"))
            out.flags.append("jitter")
            state.counter_ts = r.ts  # keep the higher value as the baseline
            return
        out.anomalies.append(Anomaly(r.ts, "reset", prev, f"counter {prev} -> {value}"))
        out.flags.append("reset")
        delta = value
    else:
        delta = diff
    if params.rated_kw is not None and delta > 0:
        if state.anchor_ts is None:
            state.anchor_ts, state.anchor_kwh = prev_ts, 0.0
        span = max(r.ts - state.anchor_ts, 0.0)
        bound = params.rated_kw * span / 3600.0 * PLAUSIBILITY_SLACK + PLAUSIBILITY_EPSILON_KWH
        if state.anchor_kwh + delta > bound:
            out.anomalies.append(Anomaly(
                r.ts, "quarantine", delta,
                f"{delta:.6f} kWh (+{state.anchor_kwh:.6f} since {state.anchor_ts:.0f}) in "
                f"{span:.1f}s exceeds rated {params.rated_kw} kW"))
            out.flags.append("quarantine")
            state.counter_kwh, state.counter_ts = value, r.ts
            return
        state.anchor_kwh += delta
        if span >= ANCHOR_WINDOW_S and elapsed >= ANCHOR_MIN_STEP_S:
            # move to the previous reading, not this one: this may be the first of a
            # burst of queued readings, whose later siblings need the time before it
            state.anchor_ts, state.anchor_kwh = prev_ts, delta
    state.counter_kwh, state.counter_ts = value, r.ts
    if delta > 0:
        out.delta_kwh = delta
        out.increments.append(Increment(prev_ts, r.ts, delta))


def _integrate(
    state: MeterState, r: Reading, power_w: float, params: MeterParams, retained: bool, out: Outcome
) -> None:
    p0, t0 = state.power_w, state.power_ts
    if p0 is None or t0 is None:
        out.flags.append("baseline")
        return
    elapsed = r.ts - t0
    if elapsed <= 0:
        return
    if retained or state.offline_since is not None or elapsed > params.max_gap_s:
        reason = "retained" if retained else "offline" if state.offline_since else "silence"
        out.gaps.append(Gap(t0, r.ts, _upper(params, elapsed), reason))
        out.flags.append("gap")
        return
    kwh = (p0 + power_w) / 2.0 * elapsed / 3_600_000.0
    if kwh > 0:
        out.delta_kwh = kwh
        out.increments.append(Increment(t0, r.ts, kwh))


def mark_offline(state: MeterState, at: float) -> None:
    """A last will said the device is gone: never carry its last power forward."""
    state.offline_since = at


def split_buckets(start_ts: float, end_ts: float, kwh: float,
                  bucket_s: int = BUCKET_S) -> Iterator[tuple[int, float]]:
    """Spread ``kwh`` evenly over ``[start_ts, end_ts]`` into fixed UTC buckets.

    Yields ``(bucket_start, kwh)``; the parts sum to ``kwh`` exactly (the last
    part takes the rounding remainder).
    """
    if end_ts <= start_ts:
        yield int(end_ts // bucket_s) * bucket_s, kwh
        return
    first = math.floor(start_ts / bucket_s) * bucket_s
    last = math.floor(end_ts / bucket_s) * bucket_s
    if end_ts == last and last > first:
        last -= bucket_s  # an increment ending exactly on an edge belongs to the earlier bucket
    if first == last:
        yield first, kwh
        return
    span = end_ts - start_ts
    given = 0.0
    b = first
    while b < last:
        part = kwh * (min(b + bucket_s, end_ts) - max(b, start_ts)) / span
        given += part
        yield b, part
        b += bucket_s
    yield last, kwh - given


class LocalDays:
    """Bucket start -> local calendar day (``YYYY-MM-DD``) in the site's zone, cached.

    Every bucket lies inside one local day because every real UTC offset is a
    multiple of 15 minutes, so summing buckets by this key splits energy exactly
    at local midnights, month ends and DST changes.
    """

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self.cache: dict[int, str] = {}

    def day(self, bucket: int) -> str:
        d = self.cache.get(bucket)
        if d is None:
            if len(self.cache) > 100_000:
                self.cache.clear()
            d = dt.datetime.fromtimestamp(bucket, self.tz).date().isoformat()
            self.cache[bucket] = d
        return d
