"""The alert state machine (pure) and its SQLite persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from monitor.config import (
    CurtailmentRule,
    EnergyCapRule,
    PowerCapRule,
    StaleDataRule,
)
from monitor.core.verdict import State, Verdict
from monitor.rules.alerts import (
    MAX_METER_EVENTS,
    AlertState,
    AlertStore,
    EventDraft,
    on_actions,
    step,
)
from monitor.rules.evaluate import AnyRule
from monitor.store.schema import MIGRATIONS

T0 = 1_795_000_000.0


def cap(**kw: Any) -> EnergyCapRule:
    return EnergyCapRule.model_validate({
        "id": "monthly-cap", "kind": "energy_cap", "limit_kwh": 6000,
        "on_warn": ["alert"], "on_breach": ["alert", "shutdown"], **kw})


def pcap(**kw: Any) -> PowerCapRule:
    return PowerCapRule.model_validate({
        "id": "pcap", "kind": "power_cap", "limit_kw": 100, "warn_at": [0.9],
        "clear_below": 0.95, "hold_s": 300, "on_breach": ["alert", "limit"], **kw})


def energy_verdict(kwh: float, period: str = "2026-11", levels: Sequence[float] = (0.8, 0.95),
                   limit: float = 6000) -> Verdict:
    ratio = kwh / limit
    state: State
    if ratio >= 1:
        state, level = "breach", 1.0
    else:
        level = max((w for w in levels if ratio >= w), default=0.0)
        state = "warning" if level else "ok"
    return Verdict(rule="monthly-cap", kind="energy_cap", scope="site", state=state, level=level,
                   value=kwh, limit=limit, unit="kWh", ratio=ratio, projected=kwh * 1.1,
                   seconds_to_limit=None, period=period, message=f"{kwh} of {limit} kWh",
                   meters=("a",), target_kw=0.0 if state == "breach" else 1.0)


def power_verdict(ratio: float) -> Verdict:
    state: State = "breach" if ratio >= 1 else ("warning" if ratio >= 0.9 else "ok")
    level = 1.0 if state == "breach" else (0.9 if state == "warning" else 0.0)
    return Verdict(rule="pcap", kind="power_cap", scope="site", state=state, level=level,
                   value=ratio * 100, limit=100.0, unit="kW", ratio=ratio, projected=None,
                   seconds_to_limit=None, period="", message=f"{ratio * 100:.0f} kW",
                   meters=("a",), target_kw=95.0)


def run(rule: AnyRule, verdicts: Sequence[tuple[float, Verdict]],
        state: AlertState | None = None) -> tuple[AlertState, list[list[EventDraft]]]:
    """Feed verdicts at their times; return the last state and the events of each step."""
    out: list[list[EventDraft]] = []
    for now, v in verdicts:
        state, events = step(state, v, now, rule)
        out.append(events)
    assert state is not None
    return state, out


def kinds(events: list[EventDraft]) -> list[tuple[str, str]]:
    return [(e.kind, e.severity) for e in events]


# --------------------------------------------------------------------------- energy cap


def test_each_warn_level_fires_once() -> None:
    seq = [4000, 4812, 4900, 5000, 5700, 5750, 5800]
    state, steps = run(cap(), [(T0 + i * 60, energy_verdict(k)) for i, k in enumerate(seq)])
    fired = [(i, e.message) for i, evs in enumerate(steps) for e in evs]
    assert fired == [(1, "4812 of 6000 kWh"), (4, "5700 of 6000 kWh")]
    assert [kinds(steps[1]), kinds(steps[4])] == [[("alert.firing", "warning")]] * 2
    assert steps[1][0].actions == ("alert",)
    assert (state.state, state.level) == ("warning", 0.95)
    assert state.since == T0 + 60  # entered warning at step 1, not re-entered at step 4


def test_skipping_past_both_levels_fires_once_at_the_highest() -> None:
    state, steps = run(cap(), [(T0, energy_verdict(100)), (T0 + 60, energy_verdict(5800))])
    assert steps[1] == [EventDraft(
        kind="alert.firing", severity="warning", rule="monthly-cap", scope="site",
        message="5800 of 6000 kWh", value=5800, limit=6000, unit="kWh", period="2026-11",
        projected=5800 * 1.1, at=T0 + 60, actions=("alert",))]
    assert state.level == 0.95


def test_a_level_that_dips_and_returns_does_not_refire() -> None:
    _, steps = run(cap(), [(T0, energy_verdict(5800)), (T0 + 60, energy_verdict(5000)),
                           (T0 + 120, energy_verdict(5800))])
    assert [len(s) for s in steps] == [1, 0, 0]


def test_breach_fires_on_breach_actions_and_resolves() -> None:
    state, steps = run(cap(), [
        (T0, energy_verdict(5900)),
        (T0 + 60, energy_verdict(6010)),
        (T0 + 120, energy_verdict(6020)),
        (T0 + 180, energy_verdict(100)),  # e.g. a corrected reading
    ])
    assert kinds(steps[1]) == [("alert.firing", "critical")]
    assert steps[1][0].actions == ("alert", "shutdown")
    assert steps[2] == []  # repeat_s = 0: no reminders
    assert kinds(steps[3]) == [("alert.resolved", "info")]
    assert steps[3][0].breach_cleared
    assert steps[3][0].actions == ("alert",)
    assert steps[3][0].message.startswith("resolved after 2 min in breach")
    assert on_actions(steps[1]) == (("alert", "shutdown"), False)
    assert on_actions(steps[3]) == (("alert",), True)
    assert (state.state, state.level) == ("ok", 0.0)


def test_repeat_reminders_of_an_unresolved_breach() -> None:
    rule = cap(repeat_s=3600)
    times = [T0 + i * 600 for i in range(14)]  # every 10 min for 2 h 10 min
    _, steps = run(rule, [(t, energy_verdict(6100)) for t in times])
    reminders = [i for i, s in enumerate(steps) if s]
    assert reminders == [0, 6, 12]
    assert steps[6][0].message.startswith("still in breach after 1 h")
    assert steps[6][0].severity == "critical"
    assert steps[6][0].actions == ("alert",)  # a reminder never re-orders a shutdown


def test_new_period_resolves_the_old_one() -> None:
    state, steps = run(cap(), [
        (T0, energy_verdict(6100, period="2026-10")),
        (T0 + 60, energy_verdict(3.5, period="2026-11")),
    ])
    assert kinds(steps[1]) == [("alert.resolved", "info")]
    ev = steps[1][0]
    assert ev.period == "2026-10"
    assert ev.value == 6100
    assert ev.breach_cleared
    assert "period 2026-10 is over; it ended in breach at 6100.0 kWh" in ev.message
    assert (state.state, state.period) == ("ok", "2026-11")


def test_new_period_that_already_warns_starts_fresh() -> None:
    state, steps = run(cap(limit_kwh=10), [
        (T0, energy_verdict(9.6, period="2026-11-26", limit=10)),
        (T0 + 60, energy_verdict(8.5, period="2026-11-27", limit=10)),
    ])
    assert kinds(steps[1]) == [("alert.resolved", "info"), ("alert.firing", "warning")]
    assert steps[1][0].period == "2026-11-26"
    assert steps[1][1].period == "2026-11-27"
    assert (state.state, state.level, state.period) == ("warning", 0.8, "2026-11-27")


def test_ok_in_a_new_period_is_silent() -> None:
    state, steps = run(cap(), [(T0, energy_verdict(10, "2026-10")),
                               (T0 + 60, energy_verdict(1, "2026-11"))])
    assert steps == [[], []]
    assert state.period == "2026-11"


# --------------------------------------------------------------------------- power cap


def test_hysteresis_on_a_flapping_power_cap() -> None:
    ratios = [1.02, 0.97, 1.01, 0.93, 0.92, 1.0, 0.9, 0.85, 0.91, 0.8, 0.8, 0.8]
    times = [T0 + i * 120 for i in range(len(ratios))]
    state, steps = run(pcap(), [(t, power_verdict(r)) for t, r in zip(times, ratios, strict=True)])
    events = [(i, e.kind, e.severity) for i, s in enumerate(steps) for e in s]
    # breach at 0; 0.97 and 1.01 stay in breach; below 0.95 from step 3, but 1.0 at step 5
    # restarts the hold; below again from 6 (t=720), held for 300 s -> leaves at 9 (t=1080)
    assert events == [(0, "alert.firing", "critical"), (9, "alert.resolved", "info")]
    assert steps[0][0].actions == ("alert", "limit")
    assert steps[9][0].breach_cleared
    assert state.state == "ok"


def test_power_cap_leaves_breach_into_warning() -> None:
    rule = pcap(hold_s=0)
    state, steps = run(rule, [(T0, power_verdict(1.1)), (T0 + 60, power_verdict(0.92))])
    assert kinds(steps[1]) == [("alert.firing", "warning")]
    assert steps[1][0].breach_cleared
    assert steps[1][0].message.startswith("breach cleared, still at warning")
    assert (state.state, state.level) == ("warning", 0.9)
    # leaving the warning needs ratio < 0.9 x 0.95
    state, events = step(state, power_verdict(0.88), T0 + 120, rule)
    assert events == []
    assert state.state == "warning"
    state, events = step(state, power_verdict(0.85), T0 + 180, rule)
    assert kinds(events) == [("alert.resolved", "info")]
    assert not events[0].breach_cleared


def test_power_cap_without_data_stays_in_breach() -> None:
    v = power_verdict(0.5)
    blind = Verdict(**{**v.__dict__, "ratio": None, "value": None, "state": "ok"})
    state, steps = run(pcap(hold_s=0), [(T0, power_verdict(1.2)), (T0 + 60, blind)])
    assert steps[1] == []
    assert state.state == "breach"


# --------------------------------------------------------------------------- stale, curtailment


def stale_verdict(stale: dict[str, float | None], state: State = "warning",
                  offline: tuple[str, ...] = ()) -> Verdict:
    return Verdict(rule="stale", kind="stale_data", scope="site",
                   state=state if stale else "ok", level=1.0 if state == "breach" else 0.0,
                   value=None, limit=900.0, unit="s", ratio=None, projected=None,
                   seconds_to_limit=None, period="", message=f"{len(stale)} stale",
                   meters=(), detail={"stale": stale, "offline": offline, "failsafe": None})


def test_stale_meters_are_announced_one_by_one() -> None:
    rule = StaleDataRule.model_validate({"id": "stale", "kind": "stale_data",
                                         "on_warn": ["alert", "shutdown"]})
    state, steps = run(rule, [
        (T0, stale_verdict({})),
        (T0 + 60, stale_verdict({"a": 1000.0, "b": None}, offline=("b",))),
        (T0 + 120, stale_verdict({"a": 1060.0, "b": None, "c": 950.0})),
        (T0 + 180, stale_verdict({"c": 1010.0})),
        (T0 + 240, stale_verdict({})),
    ])
    assert steps[0] == []
    assert [(e.kind, e.scope) for e in steps[1]] == [("meter.stale", "meter:a"),
                                                     ("meter.stale", "meter:b")]
    assert steps[1][0].actions == ("alert", "shutdown")  # entering warning: on_warn
    assert steps[1][1].actions == ("alert",)
    assert steps[1][0].message == "meter a silent for 16 min (limit 15 min)"
    assert steps[1][1].message == "meter b is offline (its last will)"
    assert [(e.kind, e.scope) for e in steps[2]] == [("meter.stale", "meter:c")]
    assert [(e.kind, e.scope, e.severity) for e in steps[3]] == [
        ("meter.recovered", "meter:a", "info"), ("meter.recovered", "meter:b", "info")]
    assert [e.kind for e in steps[4]] == ["meter.recovered", "alert.resolved"]
    assert state.state == "ok"
    assert "stale" not in state.data


def test_many_stale_meters_give_one_summary_event() -> None:
    rule = StaleDataRule.model_validate({"id": "stale", "kind": "stale_data"})
    many: dict[str, float | None] = {f"m{i:03d}": 1000.0 for i in range(MAX_METER_EVENTS + 5)}
    state, steps = run(rule, [(T0, stale_verdict(many)), (T0 + 60, stale_verdict({}))])
    assert [(e.kind, e.scope, e.value) for e in steps[0]] == [("meter.stale", "site", 25.0)]
    assert steps[0][0].message.startswith("25 meters stopped reporting: m000, m001")
    assert steps[0][0].message.endswith("(+15 more)")
    assert [e.kind for e in steps[1]] == ["meter.recovered", "alert.resolved"]
    assert state.state == "ok"


def test_stale_failsafe_breach_fires_critical() -> None:
    rule = StaleDataRule.model_validate({"id": "stale", "kind": "stale_data",
                                         "failsafe_margin": 0.05,
                                         "on_breach": ["alert", "shutdown"]})
    _, steps = run(rule, [(T0, stale_verdict({"a": 1000.0}, state="breach"))])
    assert [e.kind for e in steps[0]] == ["meter.stale", "alert.firing"]
    assert steps[0][1].actions == ("alert", "shutdown")


def test_a_new_curtailment_target_refires() -> None:
    rule = CurtailmentRule.model_validate({"id": "grid", "kind": "curtailment", "topic": "t"})

    def v(target: float | None) -> Verdict:
        return Verdict(rule="grid", kind="curtailment", scope="site",
                       state="ok" if target is None else "breach",
                       level=0.0 if target is None else 1.0, value=50.0, limit=target,
                       unit="kW", ratio=None, projected=None, seconds_to_limit=None, period="",
                       message=f"at most {target} kW", meters=("a",), target_kw=target)

    state, steps = run(rule, [(T0, v(10.0)), (T0 + 60, v(10.0)), (T0 + 120, v(0.0)),
                              (T0 + 180, v(None))])
    assert [kinds(s) for s in steps] == [
        [("alert.firing", "critical")], [], [("alert.firing", "critical")],
        [("alert.resolved", "info")]]
    assert steps[2][0].actions == ("alert", "limit")
    assert steps[2][0].message.startswith("target changed to 0 kW")
    assert state.state == "ok"


# --------------------------------------------------------------------------- bodies, storage


def test_event_body_matches_the_spec() -> None:
    _, steps = run(cap(), [(1795744800.0, energy_verdict(4812.0))])
    body = steps[0][0].body(site="irk-01", event_id="e-1")
    assert body == {
        "event_id": "e-1", "kind": "alert.firing", "severity": "warning", "site": "irk-01",
        "rule": "monthly-cap", "scope": "site", "message": "4812.0 of 6000 kWh",
        "value": 4812.0, "limit": 6000, "unit": "kWh", "period": "2026-11",
        "projected": pytest.approx(5293.2), "at": "2026-11-27T02:00:00Z",
    }


def test_state_keeps_the_latest_values_for_status() -> None:
    state, _ = run(cap(), [(T0, energy_verdict(4000)), (T0 + 60, energy_verdict(4100))])
    assert state.data["value"] == 4100
    assert state.data["limit"] == 6000
    assert state.data["unit"] == "kWh"
    assert state.data["projected"] == pytest.approx(4510.0)


def test_unchanged_state_compares_equal() -> None:
    rule = cap()
    state, _ = step(None, energy_verdict(4000), T0, rule)
    again, events = step(state, energy_verdict(4000), T0 + 60, rule)
    assert events == []
    assert again == state


def migrated(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    for _, sql in MIGRATIONS:
        conn.executescript(sql)
    return conn


def test_alert_store_round_trip(tmp_path: Path) -> None:
    conn = migrated(tmp_path / "monitor.db")
    store = AlertStore(conn)
    assert store.load_all() == {}
    rule = StaleDataRule.model_validate({"id": "stale", "kind": "stale_data"})
    st1, _ = step(None, energy_verdict(5800), T0, cap())
    st2, _ = run(pcap(), [(T0, power_verdict(1.1)), (T0 + 60, power_verdict(0.5))])
    st3, _ = step(None, stale_verdict({"a": 1000.0, "b": None}), T0, rule)
    with conn:
        for st in (st1, st2, st3):
            store.save(st)
    conn.close()

    conn = migrated_again = sqlite3.connect(tmp_path / "monitor.db")
    store = AlertStore(migrated_again)
    loaded = store.load_all()
    assert loaded == {("monthly-cap", "site"): st1, ("pcap", "site"): st2,
                      ("stale", "site"): st3}
    assert loaded[("pcap", "site")].data["clear_since"] == T0 + 60
    assert loaded[("stale", "site")].data["stale"] == ["a", "b"]
    assert store.load("monthly-cap", "site") == st1
    assert store.load("nope", "site") is None
    # the machine continues from the loaded state without re-firing
    _, events = step(loaded[("monthly-cap", "site")], energy_verdict(5850), T0 + 60, cap())
    assert events == []
    with conn:
        store.delete("pcap", "site")
    assert set(store.load_all()) == {("monthly-cap", "site"), ("stale", "site")}
    conn.close()


def test_alert_store_does_not_commit(tmp_path: Path) -> None:
    conn = migrated(tmp_path / "monitor.db")
    store = AlertStore(conn)
    st, _ = step(None, energy_verdict(5800), T0, cap())
    conn.execute("BEGIN")
    store.save(st)
    conn.rollback()
    assert store.load_all() == {}
    conn.close()
