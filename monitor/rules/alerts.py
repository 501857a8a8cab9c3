"""The alert state machine: one state per (rule, scope), fed one verdict per check.

:func:`step` is pure: previous state + verdict + ``now`` -> new state + event
drafts.  It decides *when* something is worth telling (a warning level
crossed, a breach entered, a reminder due, a breach cleared, a period over);
the actions layer decides *how* (webhooks, orders) from each draft's
``actions``.  :class:`AlertStore` persists the states in the ``alert_state``
table; the caller owns the transaction, so a state and the events it produced
are committed together (or not at all).

States: ``ok`` -> ``warning`` (each ``warn_at`` level fires once as it is
crossed; jumping past several fires once, at the highest) -> ``breach``
(fires ``on_breach``; reminders every ``repeat_s``) -> back to ``ok`` with an
``alert.resolved``.  Details in ``docs/rules.md``.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from monitor.config import Action, PowerCapRule, StaleDataRule
from monitor.core.timefmt import rfc3339
from monitor.core.verdict import State, Verdict
from monitor.rules.evaluate import AnyRule, human_duration

EventKind = Literal["alert.firing", "alert.resolved", "meter.stale", "meter.recovered"]
Severity = Literal["info", "warning", "critical"]

#: more meters than this changing at once give one summary event instead of one each
MAX_METER_EVENTS = 20

_RANK = {"ok": 0, "warning": 1, "breach": 2}
#: keys of AlertState.data copied from the latest verdict (read by `status`)
_LATEST = ("value", "limit", "unit", "projected", "ratio", "message", "seconds_to_limit")


@dataclass(frozen=True)
class AlertState:
    """The stored state of one (rule, scope).

    ``level``: the highest warn level already announced (1.0 in breach).
    ``since``: when ``state`` was entered.  ``notified_at``: the last firing or
    reminder.  ``period``: the verdict period the state belongs to.  ``data``:
    JSON-able extras -- the latest value/limit/unit/projected/ratio/message
    (for ``status``), ``clear_since`` (power-cap hysteresis), ``stale``
    (meters a stale_data rule has announced), ``target_kw`` (of the breach).
    """

    rule: str
    scope: str
    state: State = "ok"
    level: float = 0.0
    since: float | None = None
    notified_at: float | None = None
    period: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventDraft:
    """An event before it has an id: the SPEC webhook body minus ``event_id`` and ``site``.

    ``actions`` are the rule's actions this event triggers (``alert`` = deliver
    this event to the webhooks; ``shutdown``/``limit`` = order the verdict's
    scope off/down).  ``breach_cleared`` marks the end of a breach, so an
    actions layer with ``auto_resume`` can resume the scope.
    """

    kind: EventKind
    severity: Severity
    rule: str
    scope: str
    message: str
    value: float | None
    limit: float | None
    unit: str
    period: str
    projected: float | None
    at: float
    actions: tuple[Action, ...] = ()
    breach_cleared: bool = False

    def body(self, *, site: str, event_id: str) -> dict[str, Any]:
        """The SPEC webhook event body (``at`` as RFC 3339 UTC)."""
        return {
            "event_id": event_id,
            "kind": self.kind,
            "severity": self.severity,
            "site": site,
            "rule": self.rule,
            "scope": self.scope,
            "message": self.message,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "period": self.period,
            "projected": self.projected,
            "at": rfc3339(self.at),
        }


def on_actions(events: Iterable[EventDraft]) -> tuple[tuple[Action, ...], bool]:
    """The actions a step's events trigger (in order, without repeats), and whether a
    breach cleared (for ``auto_resume``)."""
    actions: dict[Action, None] = {}
    cleared = False
    for e in events:
        actions.update(dict.fromkeys(e.actions))
        cleared = cleared or e.breach_cleared
    return tuple(actions), cleared


def _alert_only(actions: Sequence[Action]) -> tuple[Action, ...]:
    return ("alert",) if "alert" in actions else ()


def _draft(
    v: Verdict,
    now: float,
    kind: EventKind,
    severity: Severity,
    message: str,
    *,
    actions: tuple[Action, ...] = (),
    breach_cleared: bool = False,
    period: str | None = None,
    value: float | None = None,
    use_verdict_value: bool = True,
) -> EventDraft:
    return EventDraft(
        kind=kind,
        severity=severity,
        rule=v.rule,
        scope=v.scope,
        message=message,
        value=v.value if use_verdict_value else value,
        limit=v.limit,
        unit=v.unit,
        period=v.period if period is None else period,
        projected=v.projected if use_verdict_value else None,
        at=now,
        actions=actions,
        breach_cleared=breach_cleared,
    )


def _meter_events(
    rule: StaleDataRule, v: Verdict, now: float, old: set[str]
) -> tuple[list[EventDraft], list[str]]:
    """meter.stale / meter.recovered for the meters whose staleness changed (each one
    delivered when ``on_warn`` has ``alert``)."""
    deliver = _alert_only(rule.on_warn)
    stale = cast("Mapping[str, float | None]", v.detail.get("stale", {}))
    offline = set(cast("Sequence[str]", v.detail.get("offline", ())))
    newly = sorted(set(stale) - old)
    back = sorted(old - set(stale))
    events: list[EventDraft] = []

    def one(kind: EventKind, mid: str) -> EventDraft:
        if kind == "meter.recovered":
            msg, sev, val = f"meter {mid} is reporting again", "info", None
        else:
            silence = stale[mid]
            sev, val = "warning", silence
            if mid in offline:
                msg = f"meter {mid} is offline (its last will)"
            elif silence is None:
                msg = f"meter {mid} has never reported"
            else:
                msg = (f"meter {mid} silent for {human_duration(silence)} "
                       f"(limit {human_duration(rule.max_silence_s)})")
        return EventDraft(kind=kind, severity=cast("Severity", sev), rule=v.rule,
                          scope=f"meter:{mid}", message=msg, value=val,
                          limit=rule.max_silence_s, unit="s", period="", projected=None, at=now,
                          actions=deliver)

    for kind, mids in (("meter.stale", newly), ("meter.recovered", back)):
        if not mids:
            continue
        k = cast("EventKind", kind)
        if len(mids) <= MAX_METER_EVENTS:
            events.extend(one(k, mid) for mid in mids)
        else:
            shown = ", ".join(mids[:10])
            what = "stopped reporting" if k == "meter.stale" else "are reporting again"
            events.append(EventDraft(
                kind=k, severity="warning" if k == "meter.stale" else "info", rule=v.rule,
                scope=v.scope,
                message=f"{len(mids)} meters {what}: {shown} (+{len(mids) - 10} more)",
                value=float(len(mids)), limit=None, unit="meters", period="", projected=None,
                at=now, actions=deliver,
            ))
    return events, sorted(stale)


def step(
    prev: AlertState | None, verdict: Verdict, now: float, rule: AnyRule
) -> tuple[AlertState, list[EventDraft]]:
    """Advance one (rule, scope) by one verdict.  Pure.

    Returns the new state (equal to ``prev`` when nothing changed, so the
    caller may skip the write) and the events to record, in order.
    """
    st = prev or AlertState(rule=verdict.rule, scope=verdict.scope, since=now,
                            period=verdict.period)
    events: list[EventDraft] = []
    data: dict[str, Any] = dict(st.data)

    # A new period (energy cap: month, day, year; ban: another window) closes
    # the old alert with the old period's label, then starts fresh.
    if st.period and verdict.period and st.period != verdict.period and st.state != "ok":
        was = st.state
        old_value = data.get("value")
        at_value = (f" at {old_value:.1f} {data.get('unit', '')}".rstrip()
                    if isinstance(old_value, int | float) else "")
        events.append(_draft(
            verdict, now, "alert.resolved", "info",
            f"period {st.period} is over; it ended in {was}{at_value}. Now {verdict.period}",
            actions=_alert_only(rule.on_breach if was == "breach" else rule.on_warn),
            breach_cleared=was == "breach", period=st.period,
            value=old_value if isinstance(old_value, int | float) else None,
            use_verdict_value=False,
        ))
        st = AlertState(rule=st.rule, scope=st.scope, since=now, period=verdict.period)
        data = {k: v for k, v in data.items() if k == "stale"}

    target: State = verdict.state
    if isinstance(rule, PowerCapRule):
        target = _hysteresis(rule, st, verdict, now, data)
    else:
        data.pop("clear_since", None)

    meter_events: list[EventDraft] = []
    if isinstance(rule, StaleDataRule):
        meter_events, stale_now = _meter_events(rule, verdict, now, set(data.get("stale", ())))
        if stale_now:
            data["stale"] = stale_now
        else:
            data.pop("stale", None)

    state, level, since, notified = st.state, st.level, st.since, st.notified_at
    if target == "breach":
        if st.state != "breach":
            events.append(_draft(verdict, now, "alert.firing", "critical", verdict.message,
                                 actions=tuple(rule.on_breach)))
            state, level, since, notified = "breach", 1.0, now, now
            data["target_kw"] = verdict.target_kw
        elif (verdict.target_kw is not None and "target_kw" in data
              and data["target_kw"] != verdict.target_kw):
            # e.g. a new curtailment request: the `limit` order must follow it
            events.append(_draft(
                verdict, now, "alert.firing", "critical",
                f"target changed to {verdict.target_kw:g} kW: {verdict.message}",
                actions=tuple(rule.on_breach)))
            data["target_kw"] = verdict.target_kw
            notified = now
        elif rule.repeat_s > 0 and (notified is None or now - notified >= rule.repeat_s):
            started = human_duration(now - since) if since is not None else "a while"
            events.append(_draft(verdict, now, "alert.firing", "critical",
                                 f"still in breach after {started}: {verdict.message}",
                                 actions=_alert_only(rule.on_breach)))
            notified = now
    elif target == "warning":
        if st.state == "breach":
            events.append(_draft(verdict, now, "alert.firing", "warning",
                                 f"breach cleared, still at warning: {verdict.message}",
                                 actions=_alert_only(rule.on_warn), breach_cleared=True))
            state, level, since, notified = "warning", verdict.level, now, now
            data.pop("target_kw", None)
        elif st.state == "ok" or verdict.level > st.level:
            first_stale = next((i for i, e in enumerate(meter_events)
                                if e.kind == "meter.stale"), None)
            if isinstance(rule, StaleDataRule) and first_stale is not None:
                # stale meters are announced per meter; the rule's actions ride on the first
                meter_events[first_stale] = replace(meter_events[first_stale],
                                                    actions=tuple(rule.on_warn))
            else:
                events.append(_draft(verdict, now, "alert.firing", "warning", verdict.message,
                                     actions=tuple(rule.on_warn)))
            if st.state == "ok":
                since = now
            state, level, notified = "warning", max(st.level, verdict.level), now
    elif st.state != "ok":
        was = st.state
        lasted = f" after {human_duration(now - st.since)} in {was}" if st.since else ""
        events.append(_draft(verdict, now, "alert.resolved", "info",
                             f"resolved{lasted}: {verdict.message}",
                             actions=_alert_only(
                                 rule.on_breach if was == "breach" else rule.on_warn),
                             breach_cleared=was == "breach"))
        state, level, since, notified = "ok", 0.0, now, now
        data.pop("target_kw", None)

    for key in _LATEST:
        latest = getattr(verdict, key)
        data[key] = None if isinstance(latest, float) and not math.isfinite(latest) else latest
    # when the limit is reached at the current rate (status shows it as a date), and
    # whether the rule's window is still filling
    to_limit = verdict.seconds_to_limit
    data["limit_at"] = (now + to_limit if to_limit is not None and math.isfinite(to_limit)
                        else None)
    data["warming_up"] = bool(verdict.detail.get("warming_up", False))
    new = AlertState(rule=st.rule, scope=st.scope, state=state, level=level, since=since,
                     notified_at=notified, period=verdict.period or st.period, data=data)
    return new, meter_events + events


def _hysteresis(
    rule: PowerCapRule, st: AlertState, v: Verdict, now: float, data: dict[str, Any]
) -> State:
    """The state a power cap may move to: it leaves breach only after the ratio stayed
    below ``clear_below`` for ``hold_s`` (a warning at level L: below L x clear_below)."""
    leaving = _RANK[v.state] < _RANK[st.state]
    if not leaving:
        data.pop("clear_since", None)
        return v.state
    threshold = rule.clear_below * (1.0 if st.state == "breach" else st.level)
    if v.ratio is None or v.ratio >= threshold:
        data.pop("clear_since", None)
        return st.state
    clear_since = data.get("clear_since")
    if not isinstance(clear_since, int | float):
        clear_since = data["clear_since"] = now
    if now - clear_since >= rule.hold_s:
        data.pop("clear_since", None)
        return v.state
    return st.state


# --------------------------------------------------------------------------- persistence


class AlertStore:
    """The ``alert_state`` table.  Never commits: the caller's transaction does, so
    a state and the events it produced land together.  Use it from the thread
    that owns ``conn``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @staticmethod
    def _row(row: Sequence[Any]) -> AlertState:
        rule, scope, state, level, since, notified_at, period, data = row
        if state not in _RANK:
            state = "breach"  # an unreadable state is treated as the worst, never as ok
        return AlertState(rule=rule, scope=scope, state=state, level=float(level), since=since,
                          notified_at=notified_at, period=period,
                          data=json.loads(data or "{}"))

    _COLS = "rule, scope, state, level, since, notified_at, period, data"

    def load_all(self) -> dict[tuple[str, str], AlertState]:
        """Every stored state, keyed by (rule, scope)."""
        rows = self.conn.execute(f"SELECT {self._COLS} FROM alert_state").fetchall()
        return {(r[0], r[1]): self._row(r) for r in rows}

    def load(self, rule: str, scope: str) -> AlertState | None:
        row = self.conn.execute(
            f"SELECT {self._COLS} FROM alert_state WHERE rule = ? AND scope = ?", (rule, scope)
        ).fetchone()
        return None if row is None else self._row(row)

    def save(self, state: AlertState) -> None:
        """Insert or replace one state (inside the caller's transaction)."""
        self.conn.execute(
            f"INSERT OR REPLACE INTO alert_state ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (state.rule, state.scope, state.state, state.level, state.since, state.notified_at,
             state.period, json.dumps(dict(state.data), sort_keys=True, allow_nan=False,
                                      default=_json_default)),
        )

    def delete(self, rule: str, scope: str) -> None:
        """Forget a state (e.g. of a rule removed from the config)."""
        self.conn.execute("DELETE FROM alert_state WHERE rule = ? AND scope = ?", (rule, scope))


def _json_default(obj: object) -> object:
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
