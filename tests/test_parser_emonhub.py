"""emonhub: node-variable topics, JSON per node, emonTx4 P/E naming, legacy CSV."""

from __future__ import annotations

import json

import pytest

from monitor.core.model import EnergyScope, ParseError, ParseResult, TsSource
from monitor.intake.parsers import make_parser

RECEIVED = 1_800_000_000.0
# Topic formats from emonhub conf/interfacer_examples/MQTT/readme.md,
# https://github.com/openenergymonitor/emonhub/blob/master/conf/interfacer_examples/MQTT/readme.md
# Input names and units (emonTx4: P1..P6 W, E1..E6 Wh, Vrms V) from conf/available.conf,
# https://github.com/openenergymonitor/emonhub/blob/master/conf/available.conf


def parse(topic: str, payload: bytes | str | object, **options: object) -> ParseResult:
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return make_parser("emonhub", options).parse(topic, payload, RECEIVED)


def reason(topic: str, payload: bytes | str | object) -> str:
    with pytest.raises(ParseError) as exc:
        parse(topic, payload)
    return exc.value.reason


def test_node_variable_power_and_energy() -> None:
    (p,) = parse("emon/emontx4/P1", b"100").readings
    assert (p.device, p.power_w, p.energy_kwh) == ("emonhub/emontx4:1", 100.0, None)
    assert (p.ts, p.ts_source) == (RECEIVED, TsSource.RECEIVED)
    (e,) = parse("emon/emontx4/E1", b"123456").readings
    assert (e.device, e.energy_kwh, e.power_w) == ("emonhub/emontx4:1", 123.456, None)
    assert e.energy_scope is EnergyScope.LIFETIME
    (p,) = parse("emon/emontx3/power2", b"55.5").readings  # emonTx3 naming
    assert (p.device, p.power_w) == ("emonhub/emontx3:2", 55.5)
    (p,) = parse("emon/emontx3/P01", b"1").readings
    assert p.device == "emonhub/emontx3:1"


def test_json_node_splits_channels_and_attaches_vrms() -> None:
    res = parse("emon/emontx4", {"MSG": 7, "Vrms": 239.1, "P1": 100, "P2": 0, "E1": 2500,
                                 "E2": 10, "T1": 21.5, "pulse": 3, "time": 1_767_225_600,
                                 "rssi": -50})
    assert [(r.device, r.power_w, r.energy_kwh, r.voltage_v) for r in res.readings] == [
        ("emonhub/emontx4:1", 100.0, 2.5, 239.1),
        ("emonhub/emontx4:2", 0.0, 0.01, 239.1),
    ]
    assert all(r.ts == 1_767_225_600.0 and r.ts_source is TsSource.DEVICE for r in res.readings)


def test_json_without_time_uses_receipt() -> None:
    (r,) = parse("emon/emonpi", {"power1": 300}).readings
    assert (r.device, r.ts, r.ts_source) == ("emonhub/emonpi:1", RECEIVED, TsSource.RECEIVED)


def test_custom_base_topic() -> None:
    (r,) = parse("site/emon/emontx4/P3", b"1", base_topic="site/emon").readings
    assert r.device == "emonhub/emontx4:3"


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("emon/emontx4/Vrms", b"240.1"),  # nothing to attach it to
        ("emon/emontx4/T1", b"21.5"),
        ("emon/emontx4/MSG", b"12"),
        ("emon/emontx4/rssi", b"-60"),
        ("emon/emonpi/power1pluspower2", b"300"),  # a sum would count twice
        ("emon/emontx4/P\u00b2", b"3"),  # not an ASCII channel number
        ("emon/emontx4/P", b"3"),
        ("emon/emontx4", {"Vrms": 240.1, "T1": 20}),
    ],
)
def test_ignored(topic: str, payload: object) -> None:
    res = parse(topic, payload)
    assert res.ignored and not res.readings


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("emonhub/rx/10/values", b"100,200,300", "unsupported_format"),
        ("emon/rx/10/values", b"100,200,300", "unsupported_format"),
        ("other/emontx4/P1", b"1", "unknown_topic"),
        ("emon/a/b/P1", b"1", "unknown_topic"),
        ("emon//P1", b"1", "unknown_topic"),
        ("emon/emontx4/P1", b"nan", "nan"),
        ("emon/emontx4/E1", b"-1", "negative"),
        ("emon/emontx4/E1", b"x", "not_a_number"),
        ("emon/emontx4", b"[1]", "wrong_type"),
        ("emon/emontx4", {"P1": "100"}, "wrong_type"),
        ("emon/emontx4", b"100", "wrong_type"),
    ],
)
def test_rejections(topic: str, payload: object, expected: str) -> None:
    assert reason(topic, payload) == expected


def test_legacy_csv_detail_says_what_to_do() -> None:
    with pytest.raises(ParseError) as exc:
        parse("emonhub/rx/10/values", b"100,200")
    assert "node-variable" in exc.value.detail
