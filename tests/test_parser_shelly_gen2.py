"""Shelly Gen2: NotifyStatus deltas merged per device, full status, 3EM phases."""

from __future__ import annotations

import json

import pytest

from monitor.core.model import Availability, ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers import Parser, make_parser

RECEIVED = 1_800_000_000.0
DEV = "shellypro4pm-f008d1d8b8b8"

# Shape of the official Switch status example (Switch#status),
# https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Switch
SWITCH_STATUS = {
    "id": 0, "source": "WS_in", "output": False, "apower": 0, "voltage": 225.9, "current": 0,
    "freq": 50,
    "aenergy": {"total": 11.679, "by_minute": [0, 0, 0], "minute_ts": 1654511972},
    "ret_aenergy": {"total": 5.817, "by_minute": [0, 0, 0], "minute_ts": 1654511615},
    "temperature": {"tC": 53.3, "tF": 127.9},
}
# Shape of a Pro 3EM NotifyStatus captured over MQTT (eddie-energy/eddie docs),
# https://github.com/eddie-energy/eddie/blob/main/aiida/docs/1-running/data-sources/mqtt/shelly/shelly-data-source.md
PRO3EM_EMDATA = (
    b'{"src": "shellypro3em-1234567890ab","dst": "aiida/12345678/events",'
    b'"method": "NotifyStatus","params": {"ts": 1757060280.21,"emdata:0": {"id": 0,'
    b'"a_total_act_energy": 0.06,"a_total_act_ret_energy": 0,"b_total_act_energy": 0.06,'
    b'"b_total_act_ret_energy": 0.01,"c_total_act_energy": 26289.44,'
    b'"c_total_act_ret_energy": 131881.85,"total_act": 26289.57,"total_act_ret": 131881.86}}}'
)


def notify(params: dict[str, object], method: str = "NotifyStatus", src: str | None = DEV) -> bytes:
    # Envelope shape of the official Notifications page,
    # https://shelly-api-docs.shelly.cloud/gen2/General/Notifications
    doc: dict[str, object] = {"dst": "user_1", "method": method, "params": params}
    if src is not None:
        doc["src"] = src
    return json.dumps(doc).encode()


def parse(p: Parser, topic: str, payload: bytes) -> ParseResult:
    return p.parse(topic, payload, RECEIVED)


def one(res: ParseResult) -> Reading:
    (r,) = res.readings
    return r


def test_full_component_status_topic() -> None:
    p = make_parser("shelly_gen2")
    r = one(parse(p, f"{DEV}/status/switch:0", json.dumps(SWITCH_STATUS).encode()))
    assert r.device == f"shelly/{DEV}:0"
    assert (r.power_w, r.energy_kwh, r.voltage_v, r.current_a) == (0.0, 0.011679, 225.9, 0.0)
    assert (r.ts, r.ts_source) == (RECEIVED, TsSource.RECEIVED)


def test_notify_status_ts_is_device_time() -> None:
    p = make_parser("shelly_gen2")
    r = one(parse(p, f"{DEV}/events/rpc", notify({"ts": 1757060280.21, "switch:1": {
        "id": 1, "apower": 1500.5, "aenergy": {"total": 2500.0}}})))
    assert (r.device, r.power_w, r.energy_kwh) == (f"shelly/{DEV}:1", 1500.5, 2.5)
    assert (r.ts, r.ts_source, r.device_ts) == (1757060280.21, TsSource.DEVICE, 1757060280.21)


def test_unset_device_clock_falls_back_to_receipt_time() -> None:
    p = make_parser("shelly_gen2")
    r = one(parse(p, f"{DEV}/events/rpc", notify({"ts": 12.5, "switch:0": {"apower": 1}})))
    assert (r.ts, r.ts_source, r.device_ts) == (RECEIVED, TsSource.RECEIVED, 12.5)
    r = one(parse(p, f"{DEV}/events/rpc", notify({"ts": "soon", "switch:0": {"apower": 1}})))
    assert (r.ts, r.ts_source, r.device_ts) == (RECEIVED, TsSource.RECEIVED, None)


def test_partial_then_partial_delta_merges_missing_keys_as_unchanged() -> None:
    p = make_parser("shelly_gen2")
    topic = f"{DEV}/events/rpc"
    # 1: power only (no base status yet): a power-only reading
    r = one(parse(p, topic, notify({"ts": 1757060280.0, "switch:0": {"id": 0, "apower": 100}})))
    assert (r.power_w, r.energy_kwh) == (100.0, None)
    # 2: energy only: power is unchanged (100), not zero
    r = one(parse(p, topic, notify({"ts": 1757060290.0, "switch:0": {
        "id": 0, "aenergy": {"total": 1000.0, "by_minute": [1, 2, 3], "minute_ts": 1}}})))
    assert (r.power_w, r.energy_kwh) == (100.0, 1.0)
    # 3: a nested partial: aenergy without total keeps the total
    r = one(parse(p, topic, notify({"ts": 1757060300.0, "switch:0": {
        "apower": 250, "aenergy": {"by_minute": [4, 5, 6]}}})))
    assert (r.power_w, r.energy_kwh, r.ts) == (250.0, 1.0, 1757060300.0)


def test_delta_on_top_of_full_status_keeps_voltage() -> None:
    p = make_parser("shelly_gen2")
    parse(p, f"{DEV}/events/rpc",
          notify({"ts": 1757060280.0, "switch:0": SWITCH_STATUS, "sys": {"uptime": 5}},
                 method="NotifyFullStatus"))
    r = one(parse(p, f"{DEV}/events/rpc", notify({"switch:0": {"id": 0, "apower": 42.5}})))
    assert (r.power_w, r.energy_kwh, r.voltage_v) == (42.5, 0.011679, 225.9)


def test_delta_without_power_or_energy_is_ignored_but_remembered() -> None:
    p = make_parser("shelly_gen2")
    topic = f"{DEV}/events/rpc"
    # shape of the official NotifyStatus example: only "output" and "source" changed
    res = parse(p, topic, notify({"ts": 1631186545.04, "switch:0": {
        "id": 0, "output": True, "source": "button"}}))
    assert res.ignored and not res.readings
    res = parse(p, topic, notify({"ts": 1631186546.0, "sys": {"ram_free": 1}}))
    assert res.ignored


def test_state_is_per_device() -> None:
    p = make_parser("shelly_gen2")
    parse(p, "a/events/rpc", notify({"switch:0": {"apower": 1, "aenergy": {"total": 5000}}},
                                    src="dev-a"))
    r = one(parse(p, "b/events/rpc", notify({"switch:0": {"apower": 2}}, src="dev-b")))
    assert (r.device, r.energy_kwh) == ("shelly/dev-b:0", None)


def test_a_rejected_delta_leaves_the_state_untouched() -> None:
    p = make_parser("shelly_gen2")
    topic = f"{DEV}/events/rpc"
    parse(p, topic, notify({"switch:0": {"apower": 10, "aenergy": {"total": 2000}}}))
    bad = parse(p, topic, notify({"switch:0": {"apower": None}}))
    assert bad.skipped == ("nan",) and one(bad).power_w is None
    r = one(parse(p, topic, notify({"switch:0": {"aenergy": {"total": 3000}}})))
    assert r.energy_kwh == 3.0


def test_one_bad_channel_keeps_the_others() -> None:
    p = make_parser("shelly_gen2")
    res = parse(p, f"{DEV}/events/rpc", notify({"switch:1": {"apower": -7, "aenergy": {"total": 1}},
                                                "switch:0": {"apower": None}}))
    assert [(r.device.rpartition(":")[2], r.power_w, r.energy_kwh) for r in res.readings] == [
        ("1", -7.0, 0.001)]
    assert "nan" in res.skipped


def test_pro3em_emdata_gives_phase_channels_without_a_total() -> None:
    p = make_parser("shelly_gen2")
    res = parse(p, "shellypro3em-1234567890ab/events/rpc", PRO3EM_EMDATA)
    assert [(r.device, r.energy_kwh, r.power_w) for r in res.readings] == [
        ("shelly/shellypro3em-1234567890ab:a", 0.00006, None),
        ("shelly/shellypro3em-1234567890ab:b", 0.00006, None),
        ("shelly/shellypro3em-1234567890ab:c", 26.28944, None),
    ]
    assert all(r.ts == 1757060280.21 and r.ts_source is TsSource.DEVICE for r in res.readings)


def test_pro3em_em_delta_emits_only_touched_phases() -> None:
    p = make_parser("shelly_gen2")
    topic = "shellypro3em-ab12/events/rpc"
    # em:0 keys as in the EM component doc,
    # https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/EM
    full = {"id": 0, "a_act_power": 1000.5, "a_voltage": 230.1, "a_current": 4.4,
            "b_act_power": 900, "b_voltage": 231, "b_current": 3.9,
            "c_act_power": 0, "c_voltage": 229, "c_current": 0, "total_act_power": 1900.5}
    res = parse(p, topic, notify({"ts": 1757060280.0, "em:0": full}, src="shellypro3em-ab12"))
    assert [r.device for r in res.readings] == [
        "shelly/shellypro3em-ab12:a", "shelly/shellypro3em-ab12:b", "shelly/shellypro3em-ab12:c",
    ]
    r = one(parse(p, topic, notify({"ts": 1757060281.0, "em:0": {
        "b_act_power": 1200, "total_act_power": 2200.5}}, src="shellypro3em-ab12")))
    assert (r.device, r.power_w, r.voltage_v, r.current_a) == (
        "shelly/shellypro3em-ab12:b", 1200.0, 231.0, 3.9,
    )
    assert parse(p, topic, notify({"em:0": {"total_act_power": 5}}, src="x")).ignored


def test_em1_and_em1data_channels() -> None:
    p = make_parser("shelly_gen2")
    r = one(parse(p, "shellyproem50-1/status/em1:1",
                  b'{"id":1,"current":2.1,"voltage":230.2,"act_power":480.5,"pf":0.99}'))
    assert (r.device, r.power_w, r.voltage_v) == ("shelly/shellyproem50-1:1", 480.5, 230.2)
    r = one(parse(p, "shellyproem50-1/status/em1data:1",
                  b'{"id":1,"total_act_energy":1234.5,"total_act_ret_energy":0}'))
    assert (r.device, r.energy_kwh, r.power_w) == ("shelly/shellyproem50-1:1", 1.2345, None)


def test_pm1_and_second_em_instance() -> None:
    p = make_parser("shelly_gen2")
    r = one(parse(p, "pm/status/pm1:0", b'{"id":0,"apower":12,"aenergy":{"total":10}}'))
    assert (r.device, r.power_w, r.energy_kwh) == ("shelly/pm:0", 12.0, 0.01)
    r = one(parse(p, "x/status/em:1", b'{"id":1,"a_act_power":3}'))
    assert r.device == "shelly/x:a1"


def test_src_is_the_device_base_else_the_topic_prefix() -> None:
    p = make_parser("shelly_gen2")
    payload = notify({"switch:0": {"apower": 1}}, src=None)
    assert one(parse(p, "site/rack7/events/rpc", payload)).device == "shelly/site/rack7:0"
    payload = notify({"switch:0": {"apower": 1}}, src="shellyplus1pm-aa")
    assert one(parse(p, "site/rack7/events/rpc", payload)).device == "shelly/shellyplus1pm-aa:0"


def test_online_is_availability() -> None:
    p = make_parser("shelly_gen2")
    assert parse(p, f"{DEV}/online", b"false").availability == (
        Availability(f"shelly/{DEV}", online=False),
    )
    assert parse(p, f"{DEV}/online", b"true").availability[0].online


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (f"{DEV}/events/rpc", notify({"ts": 1.0, "events": [{"event": "single_push"}]},
                                     method="NotifyEvent")),
        (f"{DEV}/status/sys", b'{"mac":"x","uptime":5}'),
        (f"{DEV}/status/input:0", b'{"id":0,"state":false}'),
        (f"{DEV}/status/switch:0", b'{"id":0,"output":true}'),  # Plus 1: no metering
        (f"{DEV}/rpc", b'{"id":1,"method":"Switch.Set"}'),
        (f"{DEV}/command", b"status_update"),
        (f"{DEV}/command/switch:0", b"on"),
    ],
)
def test_ignored(topic: str, payload: bytes) -> None:
    res = make_parser("shelly_gen2").parse(topic, payload, RECEIVED)
    assert res.ignored and not res.readings


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("/events/rpc", notify({}), "unknown_topic"),
        (f"{DEV}/events/rpc", b"", "empty"),
        (f"{DEV}/events/rpc", b"{oops", "not_json"),
        (f"{DEV}/events/rpc", b"[]", "wrong_type"),
        (f"{DEV}/events/rpc", b'{"params": {}}', "missing_field"),
        (f"{DEV}/events/rpc", b'{"method": "NotifyStatus"}', "missing_field"),
        (f"{DEV}/events/rpc", b'{"method": "NotifyStatus", "params": 3}', "wrong_type"),
        (f"{DEV}/events/rpc", b'{"method": "NotifyStatus", "src": 5, "params": {}}',
         "wrong_type"),
        (f"{DEV}/events/rpc", notify({"switch:0": 5}), "wrong_type"),
        (f"{DEV}/events/rpc", notify({"switch:x": {"apower": 1}}), "wrong_type"),
        (f"{DEV}/events/rpc", notify({"switch:0": {"apower": "12"}}), "wrong_type"),
        (f"{DEV}/events/rpc", notify({"switch:0": {"apower": True}}), "wrong_type"),
        (f"{DEV}/events/rpc", notify({"switch:0": {"aenergy": {"total": None}}}), "nan"),
        (f"{DEV}/events/rpc", b'{"method":"NotifyStatus","params":{"em:0":{"a_act_power":NaN}}}',
         "nan"),
        (f"{DEV}/events/rpc", notify({"emdata:0": {"c_total_act_energy": -5}}), "negative"),
        (f"{DEV}/status/switch:0", b"[1]", "wrong_type"),
        (f"{DEV}/online", b"maybe", "unknown_value"),
    ],
)
def test_rejections(topic: str, payload: bytes, expected: str) -> None:
    with pytest.raises(ParseError) as exc:
        make_parser("shelly_gen2").parse(topic, payload, RECEIVED)
    assert exc.value.reason == expected
