"""Tasmota: SENSOR/ENERGY readings, LWT availability, custom FullTopic."""

from __future__ import annotations

import json

import pytest

from monitor.core.model import Availability, ParseError, ParseResult, TsSource
from monitor.intake.parsers import make_parser

RECEIVED = 1_800_000_000.0

# Shape of tasmota/docs docs/devices/Sonoff-Pow-R2.md
# https://github.com/tasmota/docs/blob/master/docs/devices/Sonoff-Pow-R2.md
POW_R2 = (
    b'{"Time":"2018-02-15T17:37:10","ENERGY":{"TotalStartTime":"2018-11-14T18:39:40",'
    b'"Total":6.294,"Yesterday":5.340,"Today":0.954,"Period":217,"Power":2635,'
    b'"ApparentPower":2650,"ReactivePower":282,"Factor":0.99,"Voltage":227,"Current":11.661}}'
)
# Shape of tasmota/docs docs/ADC.md (a STATE message)
# https://github.com/tasmota/docs/blob/master/docs/ADC.md
STATE = (
    b'{"Time":"2019-10-31T11:14:59","Uptime":"0T18:36:12","UptimeSec":66972,"Vcc":3.423,'
    b'"Heap":28,"SleepMode":"Dynamic","Sleep":50,"LoadAvg":19,"MqttCount":6,"POWER":"OFF",'
    b'"Wifi":{"AP":1,"SSId":"Tasmota","RSSI":100,"LinkCount":1,"Downtime":"0T00:00:06"}}'
)
# Dual R3 with per-channel arrays and an unsynced clock (user log)
# https://github.com/arendst/Tasmota/issues/18385
DUAL_R3 = (
    b'{"Time":"1970-01-14T15:24:55","ENERGY":{"TotalStartTime":"1970-01-14T15:24:55",'
    b'"Total":[0.000,2.910],"Yesterday":[0.000,1.563],"Today":[0.000,1.347],'
    b'"Power":[0,1210],"Voltage":231,"Current":[0.000,5.241]}}'
)


def parse(topic: str, payload: bytes | str | object) -> ParseResult:
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return make_parser("tasmota").parse(topic, payload, RECEIVED)


def _bytes(payload: object) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def reason(topic: str, payload: bytes | str | object) -> str:
    with pytest.raises(ParseError) as exc:
        parse(topic, payload)
    return exc.value.reason


def test_pow_r2_sensor() -> None:
    (r,) = parse("tele/pow1/SENSOR", POW_R2).readings
    assert r.device == "tasmota/pow1"
    assert (r.power_w, r.energy_kwh, r.voltage_v, r.current_a) == (2635.0, 6.294, 227.0, 11.661)
    # Tasmota's Time has no offset and may be 1970: the receipt time is used.
    assert (r.ts, r.ts_source) == (RECEIVED, TsSource.RECEIVED)
    assert r.device_ts == 1_518_716_230.0  # 2018-02-15T17:37:10 read as UTC


@pytest.mark.parametrize(
    "topic",
    [
        "tele/pow1/SENSOR",
        "pow1/tele/SENSOR",  # FullTopic %topic%/%prefix%/
        "site/hall-a/tele/pow1/SENSOR",
        # the docs' Teleinfo example: https://github.com/tasmota/docs/blob/master/docs/Teleinfo.md
        "emoncms/ch2i/factory/pow1/tele/SENSOR",
    ],
)
def test_device_topic_from_a_custom_full_topic(topic: str) -> None:
    """The id is every variable segment but the %prefix% one: never the last one alone."""
    (r,) = parse(topic, POW_R2).readings
    expected = "/".join(s for s in topic.split("/")[:-1] if s != "tele")
    assert r.device == "tasmota/" + expected


def test_two_halls_with_one_device_name_are_two_meters() -> None:
    p = make_parser("tasmota", None, None, "site/tele/+/+/SENSOR")
    a = p.parse("site/tele/hall-a/rig1/SENSOR", _bytes(POW_R2), RECEIVED).readings[0]
    b = p.parse("site/tele/hall-b/rig1/SENSOR", _bytes(POW_R2), RECEIVED).readings[0]
    assert (a.device, b.device) == ("tasmota/hall-a/rig1", "tasmota/hall-b/rig1")


def test_one_bad_channel_keeps_the_others() -> None:
    res = parse("tele/pzem/SENSOR", {"ENERGY": {"Total": [1.5, -0.1, 2.0], "Power": [-0.2, 0, 7]}})
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("tasmota/pzem:1", -0.2, 1.5), ("tasmota/pzem:2", 0.0, None), ("tasmota/pzem:3", 7.0, 2.0),
    ]
    assert res.skipped == ("negative_counter",)


def test_export_and_reactive_are_not_consumption() -> None:
    res = parse("tele/bi/SENSOR", {"ENERGY": {"Total": 10.0, "ExportActive": 4.0, "Power": -300,
                                              "ImportReactive": 3.0, "Today": 1.0}})
    (r,) = res.readings
    assert (r.energy_kwh, r.export_kwh, r.power_w) == (10.0, 4.0, -300.0)
    assert set(res.skipped) == {"reactive_energy", "daily_total"}


def test_other_meter_objects_are_dead_letters_that_say_what_to_set() -> None:
    with pytest.raises(ParseError) as exc:
        parse("tele/sml/SENSOR", {"SML": {"Total_in": 1234.5, "Power_curr": 300}})
    assert exc.value.reason == "unconfigured_meter" and "meter_object" in exc.value.detail
    opts = {"meter_object": "SML", "energy_key": "Total_in", "power_key": "Power_curr"}
    (r,) = make_parser("tasmota", opts).parse(
        "tele/sml/SENSOR", b'{"SML": {"Total_in": 1234.5, "Power_curr": 300}}', RECEIVED
    ).readings
    assert (r.energy_kwh, r.power_w) == (1234.5, 300.0)


def test_multi_channel_arrays_split_into_channels_from_1() -> None:
    res = parse("tele/dual/SENSOR", DUAL_R3)
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("tasmota/dual:1", 0.0, 0.0),
        ("tasmota/dual:2", 1210.0, 2.91),
    ]
    assert [r.voltage_v for r in res.readings] == [231.0, 231.0]  # shared voltage
    assert [r.current_a for r in res.readings] == [0.0, 5.241]
    assert all(r.ts == RECEIVED and r.device_ts is not None for r in res.readings)


def test_power_array_with_one_combined_total_is_one_meter() -> None:
    # Three PZEM phases with SetOption129 0: one Total for the sum of the channels.
    energy = {"Total": 120.5, "Power": [1000, 1100, 900], "Voltage": [230, 231, 229]}
    (r,) = parse("tele/pzem3/SENSOR", {"Time": "2026-01-01T00:00:00", "ENERGY": energy}).readings
    assert (r.device, r.power_w, r.energy_kwh) == ("tasmota/pzem3", 3000.0, 120.5)


def test_power_array_without_total() -> None:
    res = parse("tele/x/SENSOR", {"ENERGY": {"Power": [5, 6]}})
    assert [(r.device, r.power_w, r.energy_kwh) for r in res.readings] == [
        ("tasmota/x:1", 5.0, None), ("tasmota/x:2", 6.0, None),
    ]


def test_epoch_and_offset_times_are_kept_as_device_ts() -> None:
    (r,) = parse("tele/p/SENSOR", {"Time": "2026-01-01T03:00:00+03:00",
                                    "ENERGY": {"Power": 1}}).readings
    assert r.device_ts == 1_767_225_600.0
    (r,) = parse("tele/p/SENSOR", {"Time": "x", "Epoch": 1_767_225_601,
                                    "ENERGY": {"Power": 1}}).readings
    assert r.device_ts == 1_767_225_601.0
    (r,) = parse("tele/p/SENSOR", {"Time": "garbage", "ENERGY": {"Power": 1}}).readings
    assert r.device_ts is None


def test_lwt_is_availability() -> None:
    assert parse("tele/pow1/LWT", b"Offline").availability == (
        Availability("tasmota/pow1", online=False),
    )
    assert parse("tele/pow1/LWT", b"Online").availability == (
        Availability("tasmota/pow1", online=True),
    )
    assert reason("tele/pow1/LWT", b"Maybe") == "unknown_value"


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("tele/pow1/STATE", STATE),
        ("tele/pow1/SENSOR", {"Time": "2026-01-01T00:00:00", "DS18B20": {"Temperature": 21.5}}),
        ("stat/pow1/RESULT", {"POWER": "ON"}),
        ("stat/pow1/POWER", "ON"),
        ("tele/pow1/INFO1", {"Module": "Sonoff Pow R2"}),
        ("stat/pow1/STATUS8", {"StatusSNS": {}}),
    ],
)
def test_ignored(topic: str, payload: object) -> None:
    res = parse(topic, payload)
    assert res.ignored and not res.readings and not res.availability


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("SENSOR", POW_R2, "unknown_topic"),
        ("tele/SENSOR", POW_R2, "unknown_topic"),
        ("tele/pow1/sensor", POW_R2, "unknown_topic"),
        ("tele/pow1/SENSOR", b"", "empty"),
        ("tele/pow1/SENSOR", b"{", "not_json"),
        ("tele/pow1/SENSOR", b"\xc3\x28", "not_utf8"),
        ("tele/pow1/SENSOR", [1, 2], "wrong_type"),
        ("tele/pow1/SENSOR", {"ENERGY": 5}, "wrong_type"),
        ("tele/pow1/SENSOR", {"ENERGY": {"Voltage": 230}}, "no_measurement"),
        ("tele/pow1/SENSOR", {"ENERGY": {"Power": "2635"}}, "wrong_type"),
        ("tele/pow1/SENSOR", {"ENERGY": {"Power": False}}, "wrong_type"),
        ("tele/pow1/SENSOR", {"ENERGY": {"Power": None}}, "no_measurement"),
        ("tele/pow1/SENSOR", '{"ENERGY": {"Power": NaN}}', "nan"),
        ("tele/pow1/SENSOR", {"ENERGY": {"Total": -0.1}}, "negative"),
        ("tele/pow1/SENSOR", {"ENERGY": {"Total": []}}, "wrong_type"),
    ],
)
def test_rejections(topic: str, payload: object, expected: str) -> None:
    assert reason(topic, payload) == expected


def test_bad_voltage_does_not_cost_the_reading() -> None:
    (r,) = parse("tele/p/SENSOR", {"ENERGY": {"Power": 5, "Voltage": "n/a"}}).readings
    assert (r.power_w, r.voltage_v) == (5.0, None)
