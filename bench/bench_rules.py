"""Benchmark: one evaluation of a realistic rule set over 10,000 meters in 50 groups.

``run()`` returns the median wall time in ms of :func:`monitor.rules.evaluate.evaluate_all`
(target: <= 200 ms), plus the alert steps that follow it.  Each repetition gets
a fresh :class:`Snapshot` so the per-snapshot scope index is rebuilt, as it is
on every check of the daemon.  Writes nothing; the harness collects the dict.

    python -m bench.bench_rules
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import statistics
import time
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import TypeAdapter

from monitor.config import Rule, SiteConfig
from monitor.core.signal import Signal
from monitor.rules.alerts import AlertState, step
from monitor.rules.evaluate import (
    AnyRule,
    MeterSnapshot,
    Snapshot,
    evaluate_all,
    periods_needed,
    windows_needed,
)

METERS = 10_000
GROUPS = 50


def rule_set() -> list[AnyRule]:
    """Per-site caps and bans, per-group energy and power caps, staleness, grid signals."""
    raw: list[dict[str, Any]] = [
        {"id": "monthly-cap", "kind": "energy_cap", "limit_kwh": 20_000_000,
         "conservative": True, "on_breach": ["alert", "shutdown"]},
        {"id": "yearly-cap", "kind": "energy_cap", "period": "calendar_year",
         "limit_kwh": 200_000_000},
        {"id": "site-power", "kind": "power_cap", "limit_kw": 40_000, "window_s": 900},
        {"id": "ban-full", "kind": "ban_window", "regions": ["RU-DA"],
         "dates": [{"from": "2025-01-01", "until": "2031-03-15"}]},
        {"id": "ban-seasonal", "kind": "ban_window", "regions": ["RU-IRK"],
         "yearly": {"start": "11-15", "end": "03-15"},
         "effective_from": "2025-01-01", "effective_until": "2031-03-15"},
        {"id": "stale", "kind": "stale_data", "max_silence_s": 900, "failsafe_margin": 0.05},
        {"id": "grid", "kind": "curtailment", "topic": "grid/curtail"},
        {"id": "reconcile", "kind": "reconcile", "main": "meter:m00000", "parts": "group:g01"},
    ]
    for g in range(GROUPS):
        raw.append({"id": f"day-cap-g{g:02d}", "kind": "energy_cap", "period": "calendar_day",
                    "limit_kwh": 20_000, "scope": f"group:g{g:02d}"})
        raw.append({"id": f"power-g{g:02d}", "kind": "power_cap", "limit_kw": 800,
                    "window_s": 900, "scope": f"group:g{g:02d}"})
        raw.append({"id": f"stale-g{g:02d}", "kind": "stale_data", "max_silence_s": 600,
                    "scope": f"group:g{g:02d}"})
    adapter: TypeAdapter[AnyRule] = TypeAdapter(Rule)
    return [adapter.validate_python(r) for r in raw]


def snapshot(rules: list[AnyRule], seed: int = 1) -> Snapshot:
    rnd = random.Random(seed)
    now = dt.datetime(2026, 11, 27, 2, tzinfo=ZoneInfo("Asia/Irkutsk")).timestamp()
    site = SiteConfig.model_validate({"id": "bench", "timezone": "Asia/Irkutsk",
                                      "category": "individual",
                                      "region": "RU-IRK", "subregion": "bratsk"})
    meters: dict[str, MeterSnapshot] = {}
    for i in range(METERS):
        mid = f"m{i:05d}"
        silent = rnd.random() < 0.01
        meters[mid] = MeterSnapshot(
            id=mid, group=f"g{i % GROUPS:02d}", rated_kw=3.5,
            last_seen=now - (2000.0 if silent else rnd.uniform(0, 60)), online=True,
            power_w=None if silent else rnd.uniform(2800, 3400), expected_interval_s=60.0)
    ids = list(meters)
    period = {p: {m: rnd.uniform(50, 2000) for m in ids} for p in periods_needed(rules)}
    gaps = {p: dict.fromkeys(ids[::97], 3.5) for p in periods_needed(rules)}
    windows = {w: dict.fromkeys(ids, 3.1 * w / 3600) for w in windows_needed(rules)}
    signals = {"grid/curtail": Signal(target_kw=0.0, until=now + 600, received_at=now - 60)}
    return Snapshot(now=now, site=site, meters=meters, period_kwh=period,
                    period_gap_kwh=gaps, window_kwh=windows, signals=signals)


def run(repeat: int = 21) -> dict[str, Any]:
    rules = rule_set()
    by_id = {r.id: r for r in rules}
    base = snapshot(rules)
    eval_ms: list[float] = []
    step_ms: list[float] = []
    states: dict[tuple[str, str], AlertState] = {}
    verdicts = []
    for i in range(repeat):
        snap = dataclasses.replace(base, now=base.now + i * 60)  # fresh index each time
        t0 = time.perf_counter()
        verdicts = evaluate_all(rules, snap)
        t1 = time.perf_counter()
        for v in verdicts:
            key = (v.rule, v.scope)
            states[key], _ = step(states.get(key), v, snap.now, by_id[v.rule])
        t2 = time.perf_counter()
        eval_ms.append((t1 - t0) * 1000)
        step_ms.append((t2 - t1) * 1000)
    return {
        "name": "rules.evaluate_all",
        "meters": METERS,
        "groups": GROUPS,
        "rules": len(rules),
        "verdicts": len(verdicts),
        "median_ms": round(statistics.median(eval_ms), 3),
        "max_ms": round(max(eval_ms), 3),
        "alerts_step_median_ms": round(statistics.median(step_ms), 3),
        "target_ms": 200,
    }


if __name__ == "__main__":
    print(run())
