"""The rule evaluation stays inside its budget: 10,000 meters in 50 groups in <= 200 ms."""

from __future__ import annotations

from bench.bench_rules import run


def test_evaluate_all_for_10k_meters_within_budget() -> None:
    result = run(repeat=5)
    assert result["meters"] == 10_000
    assert result["groups"] == 50
    assert result["verdicts"] > 150
    assert result["median_ms"] <= 200, result
