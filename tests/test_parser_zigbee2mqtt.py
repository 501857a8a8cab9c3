"""Zigbee2MQTT: JSON device state, channel keys, availability, ignored topics."""

from __future__ import annotations

import json

import pytest

from monitor.core.model import Availability, ParseError, ParseResult, TsSource
from monitor.intake.parsers import make_parser

RECEIVED = 1_800_000_000.0

# Shape of a TS011F plug state (user log),
# https://github.com/stas-demydiuk/domoticz-zigbee2mqtt-plugin/issues/455
STOPCONTACT = b'{"current":0,"energy":1.54,"linkquality":63,"power":0,"state":"ON","voltage":239}'
# Shape of a state with last_seen ISO_8601 (user log, output attribute_and_json),
# https://github.com/Koenkk/zigbee2mqtt/issues/32463
Z1 = (
    b'{"current":12.1,"energy":12.05,"last_seen":"2026-07-27T09:41:41+02:00",'
    b'"linkquality":43,"power":2780,"state":"ON","voltage":243}'
)


def parse(topic: str, payload: bytes | str | object, **options: object) -> ParseResult:
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return make_parser("zigbee2mqtt", options).parse(topic, payload, RECEIVED)


def reason(topic: str, payload: bytes | str | object) -> str:
    with pytest.raises(ParseError) as exc:
        parse(topic, payload)
    return exc.value.reason


def test_plug_state() -> None:
    (r,) = parse("zigbee2mqtt/Stopcontact", STOPCONTACT).readings
    assert r.device == "zigbee2mqtt/Stopcontact"
    assert (r.power_w, r.energy_kwh, r.voltage_v, r.current_a) == (0.0, 1.54, 239.0, 0.0)
    assert (r.ts, r.ts_source, r.device_ts) == (RECEIVED, TsSource.RECEIVED, None)


def test_last_seen_iso_is_the_device_time() -> None:
    (r,) = parse("zigbee2mqtt/z1", Z1).readings
    assert (r.power_w, r.energy_kwh) == (2780.0, 12.05)
    assert (r.ts, r.ts_source) == (1_785_138_101.0, TsSource.DEVICE)  # 07:41:41Z


def test_last_seen_epoch_ms_and_unusable_values() -> None:
    (r,) = parse("zigbee2mqtt/p", {"power": 1, "last_seen": 1_785_138_101_500}).readings
    assert (r.ts, r.ts_source) == (1_785_138_101.5, TsSource.DEVICE)
    for bad in ("2026-07-27T09:41:41", "never", None, True):
        (r,) = parse("zigbee2mqtt/p", {"power": 1, "last_seen": bad}).readings
        assert (r.ts, r.ts_source) == (RECEIVED, TsSource.RECEIVED)


def test_friendly_name_with_slashes() -> None:
    (r,) = parse("zigbee2mqtt/hall-a/rack 7/plug", STOPCONTACT).readings
    assert r.device == "zigbee2mqtt/hall-a/rack 7/plug"
    assert parse("zigbee2mqtt/hall-a/rack 7/plug/availability", b"offline").availability == (
        Availability("zigbee2mqtt/hall-a/rack 7/plug", online=False),
    )


def test_phase_keys_are_channels_when_there_is_no_plain_energy() -> None:
    doc = {"power_l1": 1000, "power_l2": 1100, "power_l3": 900, "energy_l1": 10.5,
           "energy_l2": 11, "energy_l3": 9, "voltage_l1": 230, "current_l1": 4.5,
           "power": 3000, "power_factor": 0.98, "power_on_behavior": "on"}
    res = parse("zigbee2mqtt/3ph", doc)
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("zigbee2mqtt/3ph:l1", 1000.0, 10.5),
        ("zigbee2mqtt/3ph:l2", 1100.0, 11.0),
        ("zigbee2mqtt/3ph:l3", 900.0, 9.0),
    ]
    assert (res.readings[0].voltage_v, res.readings[0].current_a) == (230.0, 4.5)


def test_plain_energy_wins_over_phase_keys() -> None:
    doc = {"energy": 30.5, "power": 3000, "power_l1": 1000, "energy_l1": 10.5}
    (r,) = parse("zigbee2mqtt/3ph", doc).readings
    assert (r.device, r.power_w, r.energy_kwh) == ("zigbee2mqtt/3ph", 3000.0, 30.5)


def test_two_clamp_meter_letter_channels() -> None:
    # PJ-1203A style: power_a/energy_a and power_b/energy_b; power_ab is not a channel
    doc = {"power_a": 500, "energy_a": 2, "power_b": 100, "energy_b": 1, "power_ab": 600,
           "energy_produced_a": 7}
    res = parse("zigbee2mqtt/clamp", doc)
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("zigbee2mqtt/clamp:a", 500.0, 2.0), ("zigbee2mqtt/clamp:b", 100.0, 1.0),
    ]


def test_power_only_and_nulls_as_not_reported() -> None:
    (r,) = parse("zigbee2mqtt/p", {"power": 12.5, "energy": None}).readings
    assert (r.power_w, r.energy_kwh) == (12.5, None)
    assert parse("zigbee2mqtt/p", {"power": None, "energy": None, "state": "ON"}).ignored


def test_custom_base_topic() -> None:
    (r,) = parse("z2m/site1/plug", STOPCONTACT, base_topic="z2m/site1").readings
    assert r.device == "zigbee2mqtt/plug"


@pytest.mark.parametrize(
    ("payload", "online"),
    [(b"online", True), (b"offline", False), (b'{"state":"online"}', True),
     (b'{"state":"offline"}', False)],
)
def test_availability(payload: bytes, online: bool) -> None:
    assert parse("zigbee2mqtt/plug/availability", payload).availability == (
        Availability("zigbee2mqtt/plug", online=online),
    )


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("zigbee2mqtt/bridge/state", b'{"state":"online"}'),
        ("zigbee2mqtt/bridge/devices", b"[]"),
        ("zigbee2mqtt/bridge/logging", b'{"level":"info","message":"x"}'),
        ("zigbee2mqtt/plug/set", b'{"state":"OFF"}'),
        ("zigbee2mqtt/plug/set/state", b"OFF"),
        ("zigbee2mqtt/plug/get", b'{"state":""}'),
        ("zigbee2mqtt/z1/power", b"0"),  # attribute topic, the JSON state has it too
        ("zigbee2mqtt/z1/state", b"ON"),
        ("zigbee2mqtt/z1/color", b'{"x":0.3,"y":0.3}'),
        ("zigbee2mqtt/door", b'{"contact":true,"battery":90}'),  # not a meter
        ("zigbee2mqtt/old-name", b""),  # clears a renamed device's retained state
    ],
)
def test_ignored(topic: str, payload: bytes) -> None:
    res = parse(topic, payload)
    assert res.ignored and not res.readings


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("other/plug", STOPCONTACT, "unknown_topic"),
        ("zigbee2mqtt/", STOPCONTACT, "unknown_topic"),
        ("zigbee2mqtt/plug", b"{", "not_json"),
        ("zigbee2mqtt/plug", b"\xfe", "not_utf8"),
        ("zigbee2mqtt/plug", b"12", "wrong_type"),
        ("zigbee2mqtt/plug", {"power": "12"}, "wrong_type"),
        ("zigbee2mqtt/plug", {"power": False}, "wrong_type"),
        ("zigbee2mqtt/plug", '{"power": NaN}', "nan"),
        ("zigbee2mqtt/plug", {"energy": -1}, "negative"),
        ("zigbee2mqtt/plug", {"energy_l1": -3}, "negative"),
        ("zigbee2mqtt/plug/availability", b"maybe", "unknown_value"),
        ("zigbee2mqtt/plug/availability", b'{"status":"online"}', "unknown_value"),
    ],
)
def test_rejections(topic: str, payload: object, expected: str) -> None:
    assert reason(topic, payload) == expected


def test_bad_base_topic_option() -> None:
    with pytest.raises(ValueError, match="base_topic"):
        make_parser("zigbee2mqtt", {"base_topic": "/"})
    with pytest.raises(ValueError, match="no option"):
        make_parser("zigbee2mqtt", {"basetopic": "z"})


def test_tuya_clamp_production_is_negative_power_and_export() -> None:
    """PJ-1203A style: power magnitude, energy_flow direction, energy_produced per channel."""
    doc = {"power_a": 500, "energy_flow_a": "producing", "energy_a": 10.5,
           "energy_produced_a": 3.25, "power_b": 200, "energy_flow_b": "consuming",
           "energy_b": 7.0, "power_ab": 700}
    res = parse("zigbee2mqtt/clamp", doc)
    assert [(r.device, r.power_w, r.energy_kwh, r.export_kwh) for r in res.readings] == [
        ("zigbee2mqtt/clamp:a", -500.0, 10.5, 3.25), ("zigbee2mqtt/clamp:b", 200.0, 7.0, None),
    ]
    assert "phase_sum" in res.skipped


def test_negative_phase_keeps_the_other_phases() -> None:
    res = parse("zigbee2mqtt/3ph", {"power_l1": -0.2, "power_l2": 900, "energy_l2": -1,
                                    "energy_l3": 5})
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("zigbee2mqtt/3ph:l1", -0.2, None), ("zigbee2mqtt/3ph:l2", 900.0, None),
        ("zigbee2mqtt/3ph:l3", None, 5.0),
    ]
    assert res.skipped == ("negative_counter",)
