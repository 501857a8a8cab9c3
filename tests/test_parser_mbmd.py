"""mbmd: one "%.3f" value per <device>/<Measurement> topic."""

from __future__ import annotations

import pytest

from monitor.model import EnergyScope, ParseError, ParseResult, TsSource
from monitor.parsers import make_parser

RECEIVED = 1_800_000_000.0
# Topic and payload shape from volkszaehler/mbmd server/mqtt.go (fmt.Sprintf("%.3f")),
# https://github.com/volkszaehler/mbmd/blob/master/server/mqtt.go
# units from meters/measurements.go (Power W, Import kWh).


def parse(topic: str, payload: bytes, **options: object) -> ParseResult:
    return make_parser("mbmd", options).parse(topic, payload, RECEIVED)


def test_power_and_import() -> None:
    (p,) = parse("mbmd/sdm1-1/Power", b"3012.500").readings
    assert (p.device, p.power_w, p.energy_kwh) == ("mbmd/sdm1-1", 3012.5, None)
    assert (p.ts, p.ts_source) == (RECEIVED, TsSource.RECEIVED)
    (e,) = parse("mbmd/sdm1-1/Import", b"10234.125").readings
    assert (e.device, e.energy_kwh, e.power_w) == ("mbmd/sdm1-1", 10234.125, None)
    assert e.energy_scope is EnergyScope.LIFETIME


def test_custom_base_topic() -> None:
    (p,) = parse("gw/modbus/sdm2-1/Power", b"1.000", base_topic="gw/modbus").readings
    assert p.device == "mbmd/sdm2-1"


@pytest.mark.parametrize(
    "topic",
    ["mbmd/status", "mbmd/sdm1-1/Voltage", "mbmd/sdm1-1/Current", "mbmd/sdm1-1/Export",
     "mbmd/sdm1-1/Sum", "mbmd/sdm1-1/Frequency", "mbmd/sdm1-1/Power/L1",
     "mbmd/sdm1-1/Import/L2"],
)
def test_ignored(topic: str) -> None:
    res = parse(topic, b"230.000")
    assert res.ignored and not res.readings


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("mbmd/sdm1-1/Power", b"NaN", "nan"),  # Go's %.3f of NaN
        ("mbmd/sdm1-1/Power", b"+Inf", "infinite"),
        ("mbmd/sdm1-1/Power", b"-1.000", "negative"),
        ("mbmd/sdm1-1/Import", b"", "empty"),
        ("mbmd/sdm1-1/Import", b"12,5", "not_a_number"),
        ("mbmd/sdm1-1", b"1", "unknown_topic"),
        ("mbmd/sdm1-1/", b"1", "unknown_topic"),
        ("mbmd/a/b/c/d", b"1", "unknown_topic"),
        ("other/sdm1-1/Power", b"1", "unknown_topic"),
    ],
)
def test_rejections(topic: str, payload: bytes, expected: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse(topic, payload)
    assert exc.value.reason == expected
