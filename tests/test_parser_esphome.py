"""ESPHome: bare-number sensor states, units from options, quantity from the name."""

from __future__ import annotations

import pytest

from monitor.model import Availability, EnergyScope, ParseError, ParseResult, TsSource
from monitor.parsers import make_parser

RECEIVED = 1_800_000_000.0
# Topic shape from esphome-docs components/mqtt.rst,
# https://github.com/esphome/esphome-docs/blob/current/components/mqtt.rst
# and the user log https://github.com/syssi/esphome-soyosource-gtn-virtual-meter/issues/71:
#   attic-powerwall/sensor/inverter0_power_demand/state 190


def parse(topic: str, payload: bytes, **options: object) -> ParseResult:
    return make_parser("esphome", options).parse(topic, payload, RECEIVED)


def reason(topic: str, payload: bytes, **options: object) -> str:
    with pytest.raises(ParseError) as exc:
        parse(topic, payload, **options)
    return exc.value.reason


def test_power_sensor() -> None:
    (r,) = parse("attic-powerwall/sensor/inverter0_power_demand/state", b"190").readings
    assert (r.device, r.power_w, r.energy_kwh) == (
        "esphome/attic-powerwall/inverter0_power_demand", 190.0, None,
    )
    assert (r.ts, r.ts_source) == (RECEIVED, TsSource.RECEIVED)


def test_energy_sensor_defaults_to_kwh_lifetime() -> None:
    (r,) = parse("rig-01/sensor/energy/state", b"1234.567").readings
    assert (r.device, r.energy_kwh, r.power_w) == ("esphome/rig-01/energy", 1234.567, None)
    assert r.energy_scope is EnergyScope.LIFETIME


@pytest.mark.parametrize("name", ["total_daily_energy", "energy_today", "daily_kwh"])
def test_daily_energy(name: str) -> None:
    (r,) = parse(f"rig/sensor/{name}/state", b"3.5").readings
    assert r.energy_scope is EnergyScope.DAILY


def test_units_from_options() -> None:
    (r,) = parse("rig/sensor/power/state", b"3.25", power_unit="kW").readings
    assert r.power_w == 3250.0
    (r,) = parse("rig/sensor/energy/state", b"105", energy_unit="Wh").readings
    assert r.energy_kwh == 0.105
    (r,) = parse("rig/sensor/energy/state", b"1.5", energy_unit="kwh").readings
    assert r.energy_kwh == 1.5


def test_name_lists_override_the_heuristic() -> None:
    opts: dict[str, object] = {"power_sensors": "load, pzem_p", "energy_sensors": "counter",
                               "ignore_sensors": "power_supply_temp"}
    (r,) = parse("rig/sensor/load/state", b"100", **opts).readings
    assert r.power_w == 100.0
    (r,) = parse("rig/sensor/counter/state", b"7", **opts).readings
    assert r.energy_kwh == 7.0
    assert parse("rig/sensor/power_supply_temp/state", b"40", **opts).ignored


def test_custom_topic_prefix_with_slashes() -> None:
    (r,) = parse("site/hall-a/rig-07/sensor/power/state", b"1").readings
    assert r.device == "esphome/site/hall-a/rig-07/power"


def test_status_is_availability_of_the_node() -> None:
    assert parse("rig-01/status", b"offline").availability == (
        Availability("esphome/rig-01", online=False),
    )
    assert parse("rig-01/status", b"online").availability[0].online


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("rig/sensor/voltage/state", b"230.1"),
        ("rig/sensor/pzem_current/state", b"4.2"),
        ("rig/sensor/chip_temperature/state", b"41"),
        ("rig/sensor/wifi_signal/state", b"-60"),
        ("rig/sensor/uptime/state", b"1000"),
        ("rig/sensor/power_factor/state", b"0.97"),
        ("rig/sensor/apparent_power/state", b"1000"),
        # a finished day is not a counter (the soyosource log's "energy_yesterday")
        ("attic-powerwall/sensor/firstfloor_inverter_energy_yesterday/state", b"0.105"),
        ("rig/switch/relay/state", b"ON"),
        ("rig/switch/relay/command", b"OFF"),
        ("rig/binary_sensor/door/state", b"OFF"),
        ("rig/debug", b"log line"),
    ],
)
def test_ignored(topic: str, payload: bytes) -> None:
    res = parse(topic, payload)
    assert res.ignored and not res.readings


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("rig/sensor/power/state", b"nan", "nan"),  # NaN as ESPHome sends it
        ("rig/sensor/power/state", b"None", "nan"),  # publish_nan_as_none
        ("rig/sensor/power/state", b"-1", "negative"),
        ("rig/sensor/energy/state", b"inf", "infinite"),
        ("rig/sensor/energy/state", b"ON", "not_a_number"),
        ("rig/sensor/energy/state", b"", "empty"),
        ("rig/sensor/load/state", b"5", "no_measurement"),
        ("rig/sensor/clamp_1/state", b"5", "no_measurement"),
        ("rig/sensor/power", b"5", "unknown_topic"),
        ("status", b"online", "unknown_topic"),
        ("rig/status", b"gone", "unknown_value"),
    ],
)
def test_rejections(topic: str, payload: bytes, expected: str) -> None:
    assert reason(topic, payload) == expected


@pytest.mark.parametrize(
    "options",
    [
        {"power_unit": "MW"},
        {"energy_unit": "J"},
        {"energy_unit": 1},
        {"power_sensors": 5},
        {"power_sensors": "a", "energy_sensors": "a"},
        {"unit": "W"},
    ],
)
def test_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="esphome"):
        make_parser("esphome", options)
