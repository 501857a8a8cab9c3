"""stale_data (with its fail-safe), curtailment signals and reconcile."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from monitor.config import (
    CurtailmentRule,
    EnergyCapRule,
    ReconcileRule,
    SiteConfig,
    StaleDataRule,
)
from monitor.core.signal import Signal, parse_signal
from monitor.rules.evaluate import (
    RUN_RATE_WINDOW_S,
    AnyRule,
    MeterSnapshot,
    Snapshot,
    evaluate,
    evaluate_all,
)

NOW = 1_795_000_000.0  # 2026-11-18


def m(mid: str, group: str = "g", *, ago: float | None = 10.0, online: bool = True,
      interval: float = 60.0, power_w: float | None = 1000.0) -> MeterSnapshot:
    return MeterSnapshot(id=mid, group=group, rated_kw=3.5,
                         last_seen=None if ago is None else NOW - ago, online=online,
                         power_w=power_w, expected_interval_s=interval)


def snap(meters: list[MeterSnapshot], *, month: Mapping[str, float] | None = None,
         windows: Mapping[float, Mapping[str, float]] | None = None,
         signals: Mapping[str, Signal] | None = None) -> Snapshot:
    return Snapshot(
        now=NOW,
        site=SiteConfig.model_validate(
            {"id": "s", "timezone": "Asia/Irkutsk", "category": "legal_entity"}),
        meters={x.id: x for x in meters},
        period_kwh={"calendar_month": month or {}},
        period_gap_kwh={},
        window_kwh={RUN_RATE_WINDOW_S: {}, **(windows or {})},
        signals=signals or {},
    )


def stale_rule(**kw: Any) -> StaleDataRule:
    return StaleDataRule.model_validate({"id": "stale", "kind": "stale_data",
                                         "max_silence_s": 900, **kw})


# --------------------------------------------------------------------------- stale_data


def test_silent_offline_and_never_seen_meters_are_stale() -> None:
    s = snap([
        m("fresh", ago=100),
        m("silent", ago=1000),
        m("slow", ago=1000, interval=1800),  # its own interval is longer than max_silence_s
        m("dead", ago=50, online=False),
        m("new", ago=None),
    ])
    (v,) = evaluate(stale_rule(), s)
    assert v.state == "warning"
    assert dict(v.detail["stale"]) == {"silent": 1000.0, "dead": 50.0, "new": None}
    assert v.detail["offline"] == ("dead",)
    assert v.value == 1000.0
    assert v.unit == "s"
    assert "3 of 5 meters not reporting" in v.message
    assert "dead (offline)" in v.message
    assert "new (never seen)" in v.message
    assert "silent (silent 16 min)" in v.message
    assert evaluate(stale_rule(scope="meter:fresh"), s)[0].state == "ok"
    assert evaluate(stale_rule(scope="meter:slow"), s)[0].state == "ok"


def test_failsafe_breach_when_stale_and_close_to_a_cap() -> None:
    cap = EnergyCapRule.model_validate({"id": "cap", "kind": "energy_cap", "limit_kwh": 1000,
                                        "scope": "group:g"})
    meters = [m("a", "g", ago=2000), m("b", "g"), m("x", "other", ago=2000)]
    rules: list[AnyRule] = [stale_rule(failsafe_margin=0.05), cap]

    def states(kwh: float, stale_scope: str = "site") -> list[tuple[str, str]]:
        r: list[AnyRule] = [stale_rule(failsafe_margin=0.05, scope=stale_scope), cap]
        return [(v.rule, v.state) for v in evaluate_all(r, snap(meters, month={"a": kwh}))]

    assert states(900) == [("stale", "warning"), ("cap", "warning")]
    assert states(950) == [("stale", "breach"), ("cap", "warning")]
    out = evaluate_all(rules, snap(meters, month={"a": 960}))
    assert out[0].detail["failsafe"] == "cap"
    assert "fail-safe: cap is at 96%" in out[0].message
    assert out[0].target_kw == 0.0
    # the only stale meter is outside the cap's group: no fail-safe
    assert states(990, stale_scope="group:other") == [("stale", "warning"), ("cap", "warning")]
    # margin 0 disables the fail-safe
    plain = evaluate_all([stale_rule(), cap], snap(meters, month={"a": 999}))
    assert plain[0].state == "warning"


def test_all_fresh_is_ok() -> None:
    (v,) = evaluate(stale_rule(), snap([m("a"), m("b")]))
    assert (v.state, v.value, v.message) == ("ok", None, "all 2 meters in site are reporting")


# --------------------------------------------------------------------------- curtailment


def curtail(**kw: Any) -> CurtailmentRule:
    return CurtailmentRule.model_validate({"id": "grid", "kind": "curtailment",
                                           "topic": "grid/ercot/4cp", **kw})


def test_curtailment_active_expired_absent() -> None:
    meters = [m("a", power_w=40000.0), m("b", power_w=20000.0)]
    active = Signal(target_kw=10.0, until=NOW + 1800, received_at=NOW - 60)
    (v,) = evaluate(curtail(), snap(meters, signals={"grid/ercot/4cp": active}))
    assert (v.state, v.target_kw, v.limit, v.value) == ("breach", 10.0, 10.0, 60.0)
    assert v.ratio == pytest.approx(6.0)
    assert "at most 10 kW until" in v.message
    assert "in 30 min" in v.message
    expired = Signal(target_kw=0.0, until=NOW, received_at=NOW - 3600)
    (v,) = evaluate(curtail(), snap(meters, signals={"grid/ercot/4cp": expired}))
    assert (v.state, v.target_kw) == ("ok", None)
    assert "last request ended" in v.message
    (v,) = evaluate(curtail(), snap(meters))
    assert v.state == "ok"
    (v,) = evaluate(curtail(), snap(meters, signals={"other/topic": active}))
    assert v.state == "ok"
    zero = Signal(target_kw=0.0, until=NOW + 60, received_at=NOW)
    (v,) = evaluate(curtail(scope="meter:a"), snap(meters, signals={"grid/ercot/4cp": zero}))
    assert (v.state, v.target_kw, v.ratio, v.meters) == ("breach", 0.0, None, ("a",))


def test_parse_signal() -> None:
    sig = parse_signal(b'{"target_kw": 0, "until": "2026-11-27T18:00:00Z"}', received_at=5.0)
    assert sig == Signal(target_kw=0.0, until=1795802400.0, received_at=5.0)
    sig = parse_signal(b'{"target_kw": 12.5, "until": "2026-11-28T02:00:00+08:00", "x": 1}', 1.0)
    assert sig.until == 1795802400.0
    assert sig.target_kw == 12.5
    assert parse_signal(json.dumps({"target_kw": 1, "until": 1795802400}).encode(), 0).until == (
        1795802400.0)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"until": "2026-11-27T18:00:00Z"}', "lacks 'target_kw'"),
        (b'{"target_kw": 0}', "lacks 'until'"),
        (b'{"target_kw": "0", "until": "2026-11-27T18:00:00Z"}', "must be a number"),
        (b'{"target_kw": true, "until": "2026-11-27T18:00:00Z"}', "must be a number"),
        (b'{"target_kw": -1, "until": "2026-11-27T18:00:00Z"}', ">= 0"),
        (b'{"target_kw": NaN, "until": "2026-11-27T18:00:00Z"}', ">= 0"),
        (b'{"target_kw": 0, "until": "tomorrow"}', "not an RFC 3339 time"),
        (b'{"target_kw": 0, "until": "2026-11-27T18:00:00"}', "needs an offset"),
        (b'{"target_kw": 0, "until": null}', "must be an RFC 3339 time"),
        (b'{"target_kw": 0, "until": false}', "not a boolean"),
    ],
)
def test_parse_signal_rejects(payload: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_signal(payload, 0.0)


# --------------------------------------------------------------------------- reconcile


def test_reconcile() -> None:
    rule = ReconcileRule.model_validate({"id": "rec", "kind": "reconcile", "main": "meter:main",
                                         "parts": "group:g", "tolerance": 0.05})
    meters = [m("main", "grid"), m("a", "g"), m("b", "g")]

    def at(main: float, a: float, b: float) -> Any:
        return evaluate(rule, snap(meters, windows={3600.0: {"main": main, "a": a, "b": b}}))[0]

    v = at(100.0, 50.0, 47.0)
    assert (v.state, v.scope, v.unit) == ("ok", "meter:main", "fraction")
    assert v.value == pytest.approx(0.03)
    assert v.meters == ("main", "a", "b")
    v = at(100.0, 50.0, 40.0)
    assert v.state == "breach"
    assert v.ratio == pytest.approx(2.0)
    assert "10.0% apart (tolerance 5.0%)" in v.message
    assert at(100.0, 60.0, 50.0).state == "breach"  # parts above main is wrong too
    v = at(0.2, 0.0, 0.0)  # idle site: meter resolution would dominate
    assert (v.state, v.value) == ("ok", None)
    assert v.detail["skipped"] is True
    assert "not compared" in v.message
