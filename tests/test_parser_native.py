"""The native ``json`` format (SPEC "Device formats and meter ids")."""

from __future__ import annotations

import json

import pytest

from monitor.core.model import EnergyScope, ParseError, ParseResult, TsSource
from monitor.intake.parsers import make_parser

RECEIVED = 1_800_000_000.0
# The example object of SPEC.md, "Device formats and meter ids".
SPEC_EXAMPLE = (
    b'{"meter": "rack-07", "ts": "2026-11-27T02:00:00Z", "power_w": 3250.0,'
    b' "energy_kwh": 10234.125, "voltage_v": 229.8, "current_a": 14.2, "seq": 1234}'
)


def parse(payload: bytes | str | object, topic: str = "site/meters") -> ParseResult:
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return make_parser("json").parse(topic, payload, RECEIVED)


def reason(payload: bytes | str | object) -> str:
    with pytest.raises(ParseError) as exc:
        parse(payload)
    return exc.value.reason


def test_spec_example() -> None:
    (r,) = parse(SPEC_EXAMPLE).readings
    assert r.device == "rack-07"
    assert r.ts == 1_795_744_800.0  # 2026-11-27T02:00:00Z
    assert r.ts_source is TsSource.DEVICE
    assert r.device_ts == r.ts
    assert (r.power_w, r.energy_kwh, r.voltage_v, r.current_a, r.seq) == (
        3250.0, 10234.125, 229.8, 14.2, 1234,
    )
    assert r.energy_scope is EnergyScope.LIFETIME


def test_without_ts_uses_receipt_time() -> None:
    (r,) = parse({"meter": "m1", "power_w": 10}).readings
    assert (r.ts, r.ts_source, r.device_ts) == (RECEIVED, TsSource.RECEIVED, None)
    assert r.energy_kwh is None
    (r,) = parse({"meter": "m1", "energy_kwh": 1, "ts": None}).readings
    assert r.ts_source is TsSource.RECEIVED


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1_795_744_800, 1_795_744_800.0),
        (1_795_744_800.5, 1_795_744_800.5),
        (1_795_744_800_123, 1_795_744_800.123),  # >= 1e11: milliseconds
        ("2026-11-27T05:00:00+03:00", 1_795_744_800.0),
        ("2026-11-27T02:00:00.250Z", 1_795_744_800.25),
    ],
)
def test_timestamps(ts: object, expected: float) -> None:
    (r,) = parse({"meter": "m", "power_w": 1, "ts": ts}).readings
    assert r.ts == pytest.approx(expected)
    assert r.ts_source is TsSource.DEVICE


@pytest.mark.parametrize(
    "ts",
    ["2026-11-27T02:00:00", "yesterday", "", True, 12.0, 0, -5, float("nan"), [1], {"s": 1}],
)
def test_bad_timestamps(ts: object) -> None:
    assert reason({"meter": "m", "power_w": 1, "ts": ts}) == "bad_timestamp"


def test_batch_yields_one_reading_per_element() -> None:
    res = parse([{"meter": "a", "power_w": 1}, {"meter": "b", "energy_kwh": 2.5}])
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("a", 1.0, None), ("b", None, 2.5),
    ]


def test_batch_with_a_bad_element_is_rejected_whole() -> None:
    with pytest.raises(ParseError) as exc:
        parse([{"meter": "a", "power_w": 1}, {"meter": "b", "energy_kwh": -3}])
    assert exc.value.reason == "negative"
    assert exc.value.detail.startswith("[1] ")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe{}", "not_utf8"),
        (b"{meter: 1}", "not_json"),
        (b"[" * 100_000, "not_json"),
        ([], "empty"),
        ("42", "wrong_type"),
        ('"text"', "wrong_type"),
        ([1], "wrong_type"),
        ({"power_w": 1}, "missing_field"),
        ({"meter": "", "power_w": 1}, "wrong_type"),
        ({"meter": 7, "power_w": 1}, "wrong_type"),
        ({"meter": "m"}, "no_measurement"),
        ({"meter": "m", "voltage_v": 230}, "no_measurement"),
        ({"meter": "m", "power_w": "3.2 kW"}, "wrong_type"),
        ({"meter": "m", "power_w": "3200"}, "wrong_type"),
        ({"meter": "m", "power_w": True}, "wrong_type"),
        ({"meter": "m", "power_w": None}, "nan"),
        ("{\"meter\": \"m\", \"power_w\": NaN}", "nan"),
        ("{\"meter\": \"m\", \"power_w\": Infinity}", "infinite"),
        ("{\"meter\": \"m\", \"energy_kwh\": 1e999}", "infinite"),
        ({"meter": "m", "energy_kwh": 10**400}, "infinite"),
        ({"meter": "m", "energy_kwh": -0.5}, "negative"),
        ({"meter": "m", "power_w": 1, "voltage_v": "230"}, "wrong_type"),
        ({"meter": "m", "power_w": 1, "seq": 1.5}, "wrong_type"),
        ({"meter": "m", "power_w": 1, "seq": False}, "wrong_type"),
        ({"meter": "m", "power_w": 1, "seq": -1}, "negative"),
    ],
)
def test_rejections(payload: object, expected: str) -> None:
    assert reason(payload) == expected


def test_sentinel_is_named_in_the_detail() -> None:
    with pytest.raises(ParseError) as exc:
        parse({"meter": "m", "energy_kwh": -1})
    assert "sentinel" in exc.value.detail


def test_signed_power_and_export_counter() -> None:
    (r,) = parse({"meter": "pv", "power_w": -1500.5, "energy_kwh": 10, "export_kwh": 3.25}).readings
    assert (r.power_w, r.energy_kwh, r.export_kwh) == (-1500.5, 10.0, 3.25)


def test_unknown_keys_are_ignored_and_device_is_kept_as_is() -> None:
    (r,) = parse({"meter": "Hall A/rack 7", "power_w": 0, "firmware": "1.2"}).readings
    assert r.device == "Hall A/rack 7"
    assert r.power_w == 0.0


def test_rejects_options() -> None:
    with pytest.raises(ValueError, match="no option"):
        make_parser("json", {"energy_unit": "Wh"})
