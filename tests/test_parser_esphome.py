"""ESPHome: bare-number sensor states, units from options, quantity from the name."""

from __future__ import annotations

import pytest

from monitor.core.model import Availability, EnergyScope, ParseError, ParseResult, TsSource
from monitor.intake.parsers import DiscoveryRegistry, make_parser

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
        "esphome/attic-powerwall", 190.0, None,
    )
    assert (r.ts, r.ts_source) == (RECEIVED, TsSource.RECEIVED)


def test_energy_sensor_defaults_to_kwh_lifetime() -> None:
    (r,) = parse("rig-01/sensor/energy/state", b"1234.567").readings
    assert (r.device, r.energy_kwh, r.power_w) == ("esphome/rig-01", 1234.567, None)
    assert r.energy_scope is EnergyScope.LIFETIME


@pytest.mark.parametrize("name", ["total_daily_energy", "energy_today", "daily_kwh"])
def test_daily_energy_is_never_consumption(name: str) -> None:
    assert parse(f"rig/sensor/{name}/state", b"3.5").ignored == "daily_total"


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
    assert r.device == "esphome/site/hall-a/rig-07"


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
        ("rig/sensor/energy/state", b"-1", "negative"),
        ("rig/sensor/energy/state", b"inf", "infinite"),
        ("rig/sensor/energy/state", b"ON", "not_a_number"),
        ("rig/sensor/energy/state", b"", "empty"),
        ("rig/sensor/gizmo/state", b"5", "no_measurement"),
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


def test_athom_plug_reads_one_counter_of_three() -> None:
    """Athom plug sensor names: energy (since boot), total_energy, total_daily_energy."""
    p = make_parser("esphome")
    out = [p.parse(f"athom/sensor/{n}/state", v, RECEIVED)
           for n, v in (("power", b"3000"), ("energy", b"0.5"), ("total_energy", b"1234.5"),
                        ("total_daily_energy", b"12.0"), ("energy", b"0.6"),
                        ("total_energy", b"1234.6"))]
    counted = [r.energy_kwh for res in out for r in res.readings if r.energy_kwh is not None]
    assert counted == [0.5, 1234.5, 1234.6]  # energy is read only until total_energy is known
    assert out[3].ignored == "daily_total" and out[4].ignored == "duplicate_counter"
    assert {r.device for res in out for r in res.readings} == {"esphome/athom"}


def test_sdm_meter_example_counts_import_once_and_power_once() -> None:
    """Sensor names of the ESPHome sdm_meter example (three-phase)."""
    p = make_parser("esphome")
    names = {"sdm_total_power": b"3000", "sdm_phase_a_power": b"1000",
             "sdm_import_active_energy": b"500", "sdm_export_active_energy": b"20",
             "sdm_import_reactive_energy": b"40", "sdm_export_reactive_energy": b"5",
             "sdm_phase_a_apparent_power": b"1100", "sdm_phase_a_power_factor": b"0.9",
             "sdm_frequency": b"50"}
    results = {n: p.parse(f"sdm/sensor/{n}/state", v, RECEIVED) for n, v in names.items()}
    readings = [r for res in results.values() for r in res.readings]
    assert [(r.device, r.power_w, r.energy_kwh, r.export_kwh) for r in readings] == [
        ("esphome/sdm", 3000.0, None, None), ("esphome/sdm", None, 500.0, None),
        ("esphome/sdm", None, None, 20.0),
    ]
    assert results["sdm_phase_a_power"].ignored == "phase_value"
    assert results["sdm_import_reactive_energy"].ignored == "reactive_energy"


def test_discovery_declaration_decides_unit_and_quantity() -> None:
    reg = DiscoveryRegistry("homeassistant")
    reg.update("homeassistant/sensor/rig/meter_a/config",
               b'{"name": "Meter A", "stat_t": "rig/sensor/meter_a/state", '
               b'"unit_of_meas": "Wh", "dev_cla": "energy", "stat_cla": "total_increasing"}')
    p = make_parser("esphome", None, reg, "rig/#")
    (r,) = p.parse("rig/sensor/meter_a/state", b"1500", RECEIVED).readings
    assert r.energy_kwh == 1.5
