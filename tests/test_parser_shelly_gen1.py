"""Shelly Gen1: plain decimals per topic, watt-minutes, emeter totals, online."""

from __future__ import annotations

import pytest

from monitor.core.model import Availability, EnergyScope, ParseError, ParseResult, TsSource
from monitor.intake.parsers import make_parser

RECEIVED = 1_800_000_000.0
# Topics and units from the official Gen1 API doc, https://shelly-api-docs.shelly.cloud/gen1/
# ("relay/0/power": W; "relay/0/energy": watt-minute; "emeter/<i>/total": Wh).


def parse(topic: str, payload: bytes) -> ParseResult:
    return make_parser("shelly_gen1").parse(topic, payload, RECEIVED)


def reason(topic: str, payload: bytes) -> str:
    with pytest.raises(ParseError) as exc:
        parse(topic, payload)
    return exc.value.reason


def test_relay_power_in_watts() -> None:
    (r,) = parse("shellies/shellyplug-s-7A3F1C/relay/0/power", b"1523.47").readings
    assert (r.device, r.power_w, r.energy_kwh) == ("shelly/shellyplug-s-7A3F1C:0", 1523.47, None)
    assert (r.ts, r.ts_source, r.device_ts) == (RECEIVED, TsSource.RECEIVED, None)


def test_relay_energy_watt_minutes_since_boot() -> None:
    (r,) = parse("shellies/shelly1pm-84CCA8/relay/0/energy", b"600000").readings
    assert (r.device, r.energy_kwh, r.power_w) == ("shelly/shelly1pm-84CCA8:0", 10.0, None)
    assert r.energy_scope is EnergyScope.SINCE_BOOT
    (r,) = parse("shellies/shelly1pm-84CCA8/relay/0/energy", b"1").readings
    assert r.energy_kwh == pytest.approx(1 / 60000)


def test_two_channel_device() -> None:
    (a,) = parse("shellies/shellyswitch25-01/relay/0/power", b"10").readings
    (b,) = parse("shellies/shellyswitch25-01/relay/1/power", b"20").readings
    assert (a.device, b.device) == ("shelly/shellyswitch25-01:0", "shelly/shellyswitch25-01:1")
    (r,) = parse("shellies/shellyswitch25-01/roller/0/power", b"30").readings
    assert r.device == "shelly/shellyswitch25-01:0"


def test_emeter_power_and_lifetime_total_in_wh() -> None:
    (p,) = parse("shellies/shellyem3-B9F3E1/emeter/2/power", b"2401.25").readings
    assert (p.device, p.power_w) == ("shelly/shellyem3-B9F3E1:2", 2401.25)
    (t,) = parse("shellies/shellyem3-B9F3E1/emeter/2/total", b"123456.7").readings
    assert (t.device, t.energy_kwh, t.power_w) == ("shelly/shellyem3-B9F3E1:2", 123.4567, None)
    assert t.energy_scope is EnergyScope.LIFETIME


@pytest.mark.parametrize(
    "topic",
    [
        # a second counter on the same channel would look like resets: not read
        "shellies/shellyem-1/emeter/0/energy",
        "shellies/shellyem-1/emeter/0/returned_energy",
        "shellies/shellyem-1/emeter/0/voltage",
        "shellies/shellyem-1/emeter/0/current",
        "shellies/shellyem-1/emeter/0/pf",
        "shellies/shellyem-1/emeter/0/reactive_power",
        "shellies/shellyem-1/relay/0",
        "shellies/shellyem-1/relay/0/command",
        "shellies/shellyplug-s-1/temperature",
        "shellies/shellyplug-s-1/overtemperature",
        "shellies/shellyplug-s-1/announce",
        "shellies/shellyplug-s-1/info",
        "shellies/shellyplug-s-1/input/0",
        "shellies/announce",
        "shellies/command",
    ],
)
def test_ignored(topic: str) -> None:
    res = parse(topic, b"1.0")
    assert res.ignored and not res.readings


def test_online_is_availability_of_the_whole_device() -> None:
    assert parse("shellies/shellyem3-B9F3E1/online", b"false").availability == (
        Availability("shelly/shellyem3-B9F3E1", online=False),
    )
    assert parse("shellies/shellyem3-B9F3E1/online", b"true").availability[0].online
    assert reason("shellies/shellyem3-B9F3E1/online", b"1") == "unknown_value"


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("shellies/x/relay/0/power", b"nan", "nan"),
        ("shellies/x/relay/0/power", b"inf", "infinite"),
        ("shellies/x/relay/0/power", b"12.3.4", "not_a_number"),
        ("shellies/x/relay/0/power", b"0x1F", "not_a_number"),
        ("shellies/x/relay/0/power", b"1_000", "not_a_number"),
        ("shellies/x/relay/0/power", b'{"value": 1}', "not_a_number"),
        ("shellies/x/relay/0/power", b"", "empty"),
        ("shellies/x/relay/0/power", b"\xff", "not_utf8"),
        ("shellies/x/emeter/0/total", b"-5", "negative"),
        ("shellies/x/relay/power", b"1", "unknown_topic"),
        ("shellies/x/frobnicate", b"1", "unknown_topic"),
        ("shellies/x", b"1", "unknown_topic"),
        ("shelly/x/relay/0/power", b"1", "unknown_topic"),
        ("shellies//relay/0/power", b"1", "unknown_topic"),
    ],
)
def test_rejections(topic: str, payload: bytes, expected: str) -> None:
    assert reason(topic, payload) == expected
