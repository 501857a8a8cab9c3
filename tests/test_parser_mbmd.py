"""mbmd: one "%.3f" value per <device>/<Measurement> topic."""

from __future__ import annotations

import pytest

from monitor.core.model import EnergyScope, ParseError, ParseResult, TsSource
from monitor.intake.parsers import make_parser

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
    ["mbmd/status", "mbmd/sdm1-1/Voltage", "mbmd/sdm1-1/Current", "mbmd/sdm1-1/Sum",
     "mbmd/sdm1-1/Frequency", "mbmd/sdm1-1/Power/L1",
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
        ("mbmd/sdm1-1/Import", b"-1.000", "negative"),
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


def test_per_phase_only_meter_is_read_as_the_sum_of_its_phases() -> None:
    p = make_parser("mbmd")
    seq = [("Power/L1", b"100.000"), ("Power/L2", b"-0.200"), ("Power/L3", b"300.000")] * 2 + [
        ("PowerL1", b"110.000")]
    out = [p.parse(f"mbmd/sdm630-1/{m}", v, RECEIVED) for m, v in seq]
    powers = [r.power_w for res in out for r in res.readings]
    assert powers == [399.8]  # at the end of the second cycle; the first taught the phases
    assert out[0].ignored == "phase_pending" and out[6].ignored == "phase_pending"


def test_sum_without_import_tells_what_to_configure() -> None:
    p = make_parser("mbmd")
    assert p.parse("mbmd/m1/Sum", b"5.000", RECEIVED).ignored == "sum_pending"
    with pytest.raises(ParseError) as exc:
        p.parse("mbmd/m1/Sum", b"5.100", RECEIVED)
    assert exc.value.reason == "unconfigured_meter" and "sum_as_import" in exc.value.detail
    (r,) = make_parser("mbmd", {"sum_as_import": "m1"}).parse(
        "mbmd/m1/Sum", b"5.100", RECEIVED).readings
    assert r.energy_kwh == 5.1


def test_export_is_its_own_counter_and_sum_beside_import_is_skipped() -> None:
    p = make_parser("mbmd")
    (i,) = p.parse("mbmd/m2/Import", b"10.000", RECEIVED).readings
    (e,) = p.parse("mbmd/m2/Export", b"4.000", RECEIVED).readings
    assert (i.energy_kwh, e.export_kwh, e.energy_kwh) == (10.0, 4.0, None)
    assert p.parse("mbmd/m2/Sum", b"14.000", RECEIVED).ignored == "import_plus_export"
