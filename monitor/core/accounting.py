"""Energy accounting per meter: readings in, exact increments, gaps and anomalies out.

Pure: nothing here reads the clock, the store or the network.  The intake
worker owns one :class:`MeterState` per meter and feeds it readings in arrival
order; :func:`apply` updates that state in place and returns what to record.

The rules, in the order they are checked:

* A reading not newer than the last applied one adds nothing (this, plus the
  intake's redelivery check, makes QoS 1 duplicates harmless) -- except when a
  clock stepped back: a reading stamped on receipt (the daemon's own clock went
  back: a bad NTP sync, an RTC in local time) or a counter reading whose value
  went *up* (a device clock that ran fast and was corrected).  Then the
  counter delta is real energy whatever the timestamps say, so it is counted,
  never re-baselined, and the meter's time is stepped with the clock
  (:func:`_step_back`): the durations between readings stay those of the
  readings' own clock (integration, the plausibility bound and gap detection
  are unchanged), but energy is *booked* never before the last booked time --
  increments are held at that instant (``hold_ts``) until the clock passes it
  again, so no closed bucket, day or month is reopened, and nothing is booked
  more than the step away from where it happened.  Anomaly ``clock_step``
  (receipt time) or ``clock_backwards`` (device time), value = the step in
  seconds (negative: back).  A step back larger than ``CLOCK_HOLD_MAX_S`` is
  not held (the stored times are wrong, e.g. from a clock far ahead or an old
  state without clock bounds): the meter's clock restarts at the new time
  (``clock_reset``), its counter kept.  A forward step needs no rule: the next
  increment spans the longer apparent interval (a power-only meter's interval
  longer than ``max_gap_s`` is then a ``silence`` gap).
* A cumulative counter (``energy_kwh``) is the source of truth when a meter has
  one.  The first value is a baseline (energy before the daemon knew the meter
  is not counted).  An increase is counted.  A decrease is a new counter cycle
  (reboot, ``EnergyReset``, a replaced meter) only when it looks like one: the
  value dropped below ``RESET_FRACTION`` (90 %, Home Assistant's recorder rule)
  of the previous one *and* by more than ``jitter_kwh``, and the new value,
  counted from zero, is plausible (at most the meter's maximum power x the time
  since the previous reading, plus slack).  Then the new value is counted
  (anomaly ``reset``).  A smaller dip (a bidirectional clamp running back a few
  Wh, rounding) is noise: nothing is counted and the higher value stays the
  baseline (``jitter`` within ``jitter_kwh``, else ``counter_backwards``, once
  per dip).  A drop whose new value is implausible from zero (another meter's
  counter, a swapped meter with a history) counts nothing: the new value
  becomes the baseline (``meter_replaced``).  A retained message whose counter
  is lower than what we hold is an old replay and is ignored.
* The maximum power of a meter is its ``rated_kw``, or ``[intake]
  unrated_max_kw`` for meters without one (auto-discovered meters are
  protected too).  Energy larger than that x elapsed time (+25 % and 0.002 kWh
  of slack) is physically impossible for the meter: the increment is
  quarantined (recorded as an anomaly, not counted) and the baseline moves on.
  The bound is cumulative from an anchor reading, not per increment: readings
  a broker queued while the daemon was down arrive milliseconds apart when it
  comes back, stamped on receipt, and only their sum can be judged against the
  time that really passed (since the anchor, which sits before the outage).
  The anchor moves forward once it is ``ANCHOR_WINDOW_S`` old, to the reading
  before one that arrived at least ``ANCHOR_MIN_STEP_S`` after its predecessor
  -- never into such a burst.
* An export counter (``export_kwh``) follows the same cycle rules, on its own
  baseline; it is never consumption.
* A meter without a counter has its power integrated with the trapezoid rule
  (production, i.e. negative power, counts as zero load), but only across gaps
  up to ``max_gap_s``; a longer gap (or one that spans an ``offline`` last
  will, or ends in a retained replay) is recorded as a data gap with its upper
  bound ``rated_kw`` x duration for the rules to use.
* Energy is booked in whole milliwatt-hours (:func:`book_mwh` carries the
  fraction to the meter's next increment), so every sum of the ledger and its
  rollups is an exact integer, whatever the order of addition.
* Device clocks are bounded (:func:`bound_clock`): a device time ahead of the
  receipt time by more than a documented skew, or older than a documented age,
  is replaced by the receipt time and recorded as an anomaly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from monitor.core.model import Reading, TsSource

BUCKET_S = 900  # ledger resolution; every real UTC offset is a multiple of 15 min
MWH_PER_KWH = 1_000_000  # the ledger's unit is the milliwatt-hour
RESET_FRACTION = 0.9  # a counter that drops below 90 % of its value may have been reset
PLAUSIBILITY_SLACK = 1.25
PLAUSIBILITY_EPSILON_KWH = 0.002  # two digits of a 0.001 kWh counter (rounding)
ANCHOR_WINDOW_S = 3600.0
ANCHOR_MIN_STEP_S = 1.0
#: the largest clock step back whose energy is held at the last booked time (see the
#: module docstring); DST/zone confusions and bad NTP syncs are hours, never more
CLOCK_HOLD_MAX_S = 6 * 3600.0


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
    dip: bool = False  # the counter is below its baseline (one counter_backwards per dip)
    export_kwh: float | None = None  # export counter baseline
    export_ts: float | None = None
    carry_mwh: float = 0.0  # the fraction of a mWh not booked yet (about 0 <= carry < 1)
    #: after a clock step back: energy is booked at this time until the clock passes it
    hold_ts: float | None = None

    def to_json(self) -> str:
        # written for every meter a batch touched: no dataclasses.asdict (deep copies)
        return json.dumps({k: getattr(self, k) for k in _STATE_FIELDS}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> MeterState:
        data = json.loads(text or "{}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


_STATE_FIELDS = tuple(MeterState.__dataclass_fields__)
_STATE_VALUES = operator.attrgetter(*_STATE_FIELDS)


def state_values(state: MeterState) -> tuple[object, ...]:
    """Every field of ``state``, cheaply (a batch keeps one per meter it touches)."""
    values: tuple[object, ...] = _STATE_VALUES(state)
    return values


def restore_state(state: MeterState, values: tuple[object, ...]) -> None:
    """Put back the fields :func:`state_values` took."""
    for name, value in zip(_STATE_FIELDS, values, strict=True):
        setattr(state, name, value)


@dataclass(frozen=True, slots=True)
class MeterParams:
    rated_kw: float | None = None
    max_gap_s: float = 900.0
    jitter_kwh: float = 0.002
    unrated_max_kw: float = 1000.0  # the bound of a meter without rated_kw

    @property
    def max_kw(self) -> float:
        return self.rated_kw if self.rated_kw is not None else self.unrated_max_kw


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
    #: reset | meter_replaced | counter_backwards | jitter | quarantine | out_of_order |
    #: stale_retained | clock_backwards | clock_step | clock_ahead | clock_too_old |
    #: clock_reset | implausible_power
    kind: str
    value: float | None
    detail: str = ""


@dataclass(slots=True)
class Outcome:
    delta_kwh: float = 0.0
    export_delta_kwh: float = 0.0
    increments: list[Increment] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    #: the time this reading's energy is booked at (its own, or a held ``hold_ts``)
    book_ts: float = 0.0


def plausible_power(power_w: float, params: MeterParams) -> bool:
    """A power the meter can draw: finite and within its bound (with the same slack
    as counters).  Production (negative) is bounded the same way."""
    return math.isfinite(power_w) and abs(power_w) <= params.max_kw * 1000.0 * PLAUSIBILITY_SLACK


def _upper(params: MeterParams, seconds: float) -> float | None:
    return None if params.rated_kw is None else params.rated_kw * seconds / 3600.0


def _slack(kw: float, seconds: float) -> float:
    return kw * max(seconds, 0.0) / 3600.0 * PLAUSIBILITY_SLACK + PLAUSIBILITY_EPSILON_KWH


def apply(state: MeterState, r: Reading, params: MeterParams, retained: bool = False) -> Outcome:
    """Account one reading; updates ``state`` in place.  Called by the intake worker only."""
    out = Outcome()
    ts = r.ts
    if state.last_ts is not None and ts < state.last_ts:
        ahead = (r.energy_kwh is not None and state.counter_kwh is not None
                 and r.energy_kwh > state.counter_kwh)
        if retained or not (ahead or r.ts_source is TsSource.RECEIVED):
            out.anomalies.append(Anomaly(ts, "out_of_order", r.energy_kwh,
                                         f"after {state.last_ts}"))
            out.flags.append("out_of_order")
            out.book_ts = max(ts, state.hold_ts or ts)
            return out
        kind = "clock_step" if r.ts_source is TsSource.RECEIVED else "clock_backwards"
        out.anomalies.append(_step_back(state, ts, kind, params))
        out.flags.append(out.anomalies[-1].kind)
    power_w = r.power_w
    if power_w is not None and not plausible_power(power_w, params):
        # a power the meter cannot draw is never integrated, never its "latest power"
        # (the power caps read that), and never crashes the worker (1e308 W overflows)
        out.anomalies.append(Anomaly(
            ts, "implausible_power", power_w if math.isfinite(power_w) else None,
            f"{power_w:g} W exceeds {params.max_kw:g} kW"
            f"{'' if params.rated_kw is not None else ' (intake.unrated_max_kw)'}; "
            "not counted"))
        out.flags.append("implausible_power")
        power_w = None
    if r.energy_kwh is not None:
        _counter(state, ts, r.energy_kwh, params, retained, out)
    elif power_w is not None and not state.has_counter:
        _integrate(state, ts, power_w, params, retained, out)
    if r.export_kwh is not None:
        _export(state, ts, r.export_kwh, params, retained, out)
    if power_w is not None:
        state.power_w = power_w
        state.power_ts = ts
    state.offline_since = None
    state.last_ts = ts
    _book(state, ts, out)
    return out


def _shift(t: float | None, by: float) -> float | None:
    return None if t is None else t + by


def _step_back(state: MeterState, ts: float, kind: str, params: MeterParams) -> Anomaly:
    """The meter's clock stepped back to ``ts``: step its stored times with it.

    Every stored time moves by the step, so the next durations are those the
    readings' own clock measures, and the counter baseline is kept.  The
    interval across the step has no known length: power is not integrated over
    it (a power-only meter's reading across the step is only a new baseline),
    and the plausibility bounds judge it as if it lasted ``max_gap_s`` (the
    counter, export and anchor times move ``max_gap_s`` further back), so a
    real delta across the step is never quarantined for want of time.  Energy is then
    held at the last booked time (``hold_ts``) until the clock passes it again;
    a step beyond :data:`CLOCK_HOLD_MAX_S` is not held (``clock_reset``).
    """
    assert state.last_ts is not None
    booked = max(state.last_ts, state.hold_ts if state.hold_ts is not None else state.last_ts)
    if kind == "clock_reset" or booked - ts > CLOCK_HOLD_MAX_S:
        kind, state.hold_ts = "clock_reset", None
        detail = (f"stored time {state.last_ts} is {state.last_ts - ts:.0f}s after this "
                  f"reading (more than {CLOCK_HOLD_MAX_S:.0f}s held at most): the meter's "
                  "clock restarts now, its counter kept")
    else:
        state.hold_ts = booked
        detail = (f"{kind.replace('_', ' ')} of {ts - state.last_ts:.3f}s (from "
                  f"{state.last_ts} to {ts}): energy booked at {booked} until the clock "
                  "passes it")
    step = ts - state.last_ts
    credit = step - params.max_gap_s  # the interval across the step, for the bounds only
    if state.anchor_ts is None and state.counter_ts is not None:
        state.anchor_ts, state.anchor_kwh = state.counter_ts, 0.0
    state.counter_ts = _shift(state.counter_ts, credit)
    state.power_ts = _shift(state.power_ts, step)
    state.export_ts = _shift(state.export_ts, credit)
    state.anchor_ts = _shift(state.anchor_ts, credit)
    state.offline_since = _shift(state.offline_since, step)
    state.last_ts = ts
    return Anomaly(ts, kind, step, detail)


def restart_clock(state: MeterState, ts: float, params: MeterParams) -> Anomaly:
    """``clock_reset``: the state's times are far ahead of ``ts`` (an older version
    stored an unbounded device time, or the clock was corrected by more than
    :data:`CLOCK_HOLD_MAX_S`); step them back to ``ts``, counter kept, nothing held."""
    return _step_back(state, ts, "clock_reset", params)


def _book(state: MeterState, ts: float, out: Outcome) -> None:
    """Never book before the time held since a clock step (see :func:`_step_back`)."""
    hold = state.hold_ts
    if hold is None:
        out.book_ts = ts
        return
    if ts >= hold:  # the clock has passed the held time: from it on, as usual
        state.hold_ts = None
        out.book_ts = ts
        out.increments = [Increment(max(i.start_ts, hold), i.end_ts, i.kwh)
                          for i in out.increments]
        out.gaps = [dataclasses.replace(g, start_ts=max(g.start_ts, hold))
                    for g in out.gaps]
        return
    out.book_ts = hold
    out.increments = [Increment(hold, hold, i.kwh) for i in out.increments]
    out.gaps = [dataclasses.replace(g, start_ts=hold, end_ts=hold) for g in out.gaps]


def _counter(
    state: MeterState, ts: float, value: float, params: MeterParams, retained: bool,
    out: Outcome,
) -> None:
    prev, prev_ts = state.counter_kwh, state.counter_ts
    state.has_counter = True
    if prev is None or prev_ts is None:
        state.counter_kwh, state.counter_ts = value, ts
        out.flags.append("baseline")
        return
    elapsed = ts - prev_ts
    diff = value - prev
    max_kw = params.max_kw
    if diff < 0:
        if retained:
            out.anomalies.append(Anomaly(ts, "stale_retained", value, f"counter {prev}"))
            out.flags.append("stale_retained")
            return
        if -diff <= params.jitter_kwh or value >= prev * RESET_FRACTION:
            # a dip: noise.  The higher value stays the baseline, so the energy is
            # counted once the counter is past it again, never twice.
            kind = "jitter" if -diff <= params.jitter_kwh else "counter_backwards"
            if kind == "jitter" or not state.dip:
                out.anomalies.append(Anomaly(ts, kind, diff, f"counter {prev} -> {value}"))
            out.flags.append(kind)
            state.dip = kind == "counter_backwards" or state.dip
            state.counter_ts = ts
            return
        if value > _slack(max_kw, elapsed):
            out.anomalies.append(Anomaly(
                ts, "meter_replaced", value,
                f"counter {prev} -> {value}: {value} kWh from zero in {elapsed:.1f}s exceeds "
                f"{max_kw:g} kW; new baseline, nothing counted"))
            out.flags.append("meter_replaced")
            state.counter_kwh, state.counter_ts, state.dip = value, ts, False
            state.anchor_ts, state.anchor_kwh = ts, 0.0
            return
        out.anomalies.append(Anomaly(ts, "reset", prev, f"counter {prev} -> {value}"))
        out.flags.append("reset")
        delta = value
    else:
        delta = diff
    state.dip = False
    if delta > 0:
        if state.anchor_ts is None:
            state.anchor_ts, state.anchor_kwh = prev_ts, 0.0
        span = max(ts - state.anchor_ts, 0.0)
        if state.anchor_kwh + delta > _slack(max_kw, span):
            out.anomalies.append(Anomaly(
                ts, "quarantine", delta,
                f"{delta:.6f} kWh (+{state.anchor_kwh:.6f} since {state.anchor_ts:.0f}) in "
                f"{span:.1f}s exceeds {max_kw:g} kW"
                f"{'' if params.rated_kw is not None else ' (intake.unrated_max_kw)'}"))
            out.flags.append("quarantine")
            state.counter_kwh, state.counter_ts = value, ts
            return
        state.anchor_kwh += delta
        if span >= ANCHOR_WINDOW_S and elapsed >= ANCHOR_MIN_STEP_S:
            # move to the previous reading, not this one: this may be the first of a
            # burst of queued readings, whose later siblings need the time before it
            state.anchor_ts, state.anchor_kwh = prev_ts, delta
    state.counter_kwh, state.counter_ts = value, ts
    if delta > 0:
        out.delta_kwh = delta
        out.increments.append(Increment(prev_ts, ts, delta))


def _export(state: MeterState, ts: float, value: float, params: MeterParams, retained: bool,
            out: Outcome) -> None:
    """The export counter: same cycle rules as the import one, no anchor (never a limit)."""
    prev, prev_ts = state.export_kwh, state.export_ts
    if prev is None or prev_ts is None:
        state.export_kwh, state.export_ts = value, ts
        return
    if retained and value < prev:
        return
    diff = value - prev
    state.export_ts = ts
    if diff < 0:
        if -diff <= params.jitter_kwh or value >= prev * RESET_FRACTION:
            return
        state.export_kwh = value
        if value <= _slack(params.max_kw, ts - prev_ts):
            out.export_delta_kwh = value
        return
    if diff > _slack(params.max_kw, ts - prev_ts):
        out.anomalies.append(Anomaly(ts, "quarantine", diff, f"export {prev} -> {value}"))
        state.export_kwh = value
        return
    state.export_kwh = value
    out.export_delta_kwh = diff


def _integrate(
    state: MeterState, ts: float, power_w: float, params: MeterParams, retained: bool,
    out: Outcome,
) -> None:
    p0, t0 = state.power_w, state.power_ts
    if p0 is None or t0 is None:
        out.flags.append("baseline")
        return
    elapsed = ts - t0
    if elapsed <= 0:
        return
    if retained or state.offline_since is not None or elapsed > params.max_gap_s:
        reason = "retained" if retained else "offline" if state.offline_since else "silence"
        out.gaps.append(Gap(t0, ts, _upper(params, elapsed), reason))
        out.flags.append("gap")
        return
    # production (negative power) is never load
    kwh = (max(p0, 0.0) + max(power_w, 0.0)) / 2.0 * elapsed / 3_600_000.0
    if kwh > 0:
        out.delta_kwh = kwh
        out.increments.append(Increment(t0, ts, kwh))


def mark_offline(state: MeterState, at: float) -> None:
    """A last will said the device is gone: never carry its last power forward."""
    state.offline_since = at


def _bucket_range(start_ts: float, end_ts: float, bucket_s: int) -> tuple[int, int]:
    """The first and last bucket ``[start_ts, end_ts]`` spans (one bucket for an empty
    interval; an interval ending exactly on an edge belongs to the earlier bucket)."""
    last = math.floor(end_ts / bucket_s) * bucket_s
    if end_ts <= start_ts:
        return last, last
    first = math.floor(start_ts / bucket_s) * bucket_s
    if end_ts == last and last > first:
        last -= bucket_s
    return first, last


def split_buckets(start_ts: float, end_ts: float, kwh: float,
                  bucket_s: int = BUCKET_S) -> Iterator[tuple[int, float]]:
    """Spread ``kwh`` evenly over ``[start_ts, end_ts]`` into fixed UTC buckets.

    Yields ``(bucket_start, kwh)``; the parts sum to ``kwh`` exactly (the last
    part takes the rounding remainder).
    """
    first, last = _bucket_range(start_ts, end_ts, bucket_s)
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


def book_mwh(state: MeterState, kwh: float) -> int:
    """Whole mWh of ``kwh`` to book now; the fraction is carried to the next increment.

    The ledger stores integers so that its sums are exact in any order; carrying
    the remainder means many tiny increments (a 5 W plug integrated every 10 s)
    are not rounded away.
    """
    exact = kwh * MWH_PER_KWH + state.carry_mwh
    # float noise of the device's decimal steps (0.1 kWh is not a binary fraction)
    # accumulates over thousands of increments; 0.1 µWh of tolerance absorbs it
    whole = max(0, math.floor(exact + 1e-4))
    state.carry_mwh = exact - whole  # may be -1e-4 .. 1
    return int(whole)


def split_mwh(start_ts: float, end_ts: float, mwh: int,
              bucket_s: int = BUCKET_S) -> Iterator[tuple[int, int]]:
    """Spread whole ``mwh`` over ``[start_ts, end_ts]`` into fixed UTC buckets.

    Yields ``(bucket_start, mwh)`` with integer parts that sum to ``mwh``
    exactly, in proportion to the time each bucket holds.  It yields one item
    per bucket the interval really spans, never more.
    """
    first, last = _bucket_range(start_ts, end_ts, bucket_s)
    if first == last:
        yield first, mwh
        return
    span = end_ts - start_ts
    given = 0
    b = first
    while b < last:
        upto = min(int(mwh * ((b + bucket_s) - start_ts) / span), mwh)
        if upto > given:
            yield b, upto - given
            given = upto
        b += bucket_s
    if mwh > given:
        yield last, mwh - given


@dataclass(frozen=True, slots=True)
class ClockBounds:
    """How far a device clock may be from the receipt time (``[intake]`` keys)."""

    max_ahead_s: float = 120.0
    max_behind_s: float = 7 * 86400.0


def bound_clock(r: Reading, received_at: float, bounds: ClockBounds) -> tuple[Reading, str]:
    """``r`` with an implausible device time replaced by the receipt time.

    Returns the reading to account and the anomaly kind (``clock_ahead``,
    ``clock_too_old``) or ``""``.  A device time in microseconds or nanoseconds, a
    clock days fast, or a clock never set must not move energy into other days or
    make the intake walk millions of buckets; the device's own time is kept in
    ``device_ts`` as evidence.
    """
    if r.ts_source is not TsSource.DEVICE and abs(r.ts - received_at) < 1.0:
        return r, ""
    kind = ""
    if not math.isfinite(r.ts) or r.ts > received_at + bounds.max_ahead_s:
        kind = "clock_ahead"
    elif r.ts < received_at - bounds.max_behind_s:
        kind = "clock_too_old"
    if not kind:
        return r, ""
    return dataclasses.replace(r, ts=received_at, ts_source=TsSource.RECEIVED,
                               device_ts=r.ts if math.isfinite(r.ts) else None), kind


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
