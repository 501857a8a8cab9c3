"""The exporter's pure parts: line protocol builders and error translation."""

from __future__ import annotations

import email.utils
import time

import pytest

from monitor.outputs.exporter import (
    ExportRefusedError,
    ExportRejectedError,
    ExportUnavailableError,
    translate_status,
)
from monitor.outputs.lineproto import event_line, reading_line, rule_line, ts_ns


def test_ts_ns_rounds_to_microseconds() -> None:
    assert ts_ns(1_790_000_000.0) == 1_790_000_000_000_000_000
    assert ts_ns(1_790_000_000.1234567) == 1_790_000_000_123_457_000
    # the same float always maps to the same integer, whatever arithmetic produced it
    assert ts_ns(0.1 + 0.2) == ts_ns(0.3) == 300_000_000


def test_reading_line_tags_sorted_fields_in_order() -> None:
    line = reading_line("irk-01", "rack-07", "hall-a", "tasmota", 1_790_000_000.5,
                        power_w=3250.0, energy_kwh=10234.125, delta_kwh=0.01,
                        voltage_v=229.8, current_a=14.2)
    assert line == (
        "energy_reading,format=tasmota,group=hall-a,meter=rack-07,site=irk-01 "
        "power_w=3250.0,energy_kwh=10234.125,energy_delta_kwh=0.01,voltage_v=229.8,"
        "current_a=14.2 1790000000500000000"
    )


def test_reading_line_omits_null_and_non_finite_fields_and_empty_tags() -> None:
    line = reading_line("irk-01", "shelly/pro3em-ab12:a", "", "", 1.0, power_w=None,
                        energy_kwh=float("nan"), delta_kwh=0.0, voltage_v=float("inf"))
    assert line == ("energy_reading,meter=shelly/pro3em-ab12:a,site=irk-01 "
                    "energy_delta_kwh=0.0 1000000000")
    assert reading_line("s", "m", "", "", 1.0, power_w=None, energy_kwh=None,
                        delta_kwh=None) is None


def test_integers_are_written_as_floats() -> None:
    # a field's type is fixed per shard in InfluxDB: 6000 and 6000.5 must both be floats
    line = rule_line("s", "monthly-cap", "site", 4812, 6000, 0.802, 6411.3, 1, 2.0)
    assert " value=4812.0,limit=6000.0,ratio=0.802,projected=6411.3,state=1i " in line


def test_tag_escaping() -> None:
    line = event_line("irk-01", "alert.firing", "cap, hall=a b", "m", 0.0)
    assert r",rule=cap\,\ hall\=a\ b,site=irk-01 " in line
    # a trailing backslash would escape the separator: dropped; newlines become spaces
    line = rule_line("s", "r\\", "group:a\nb", None, None, None, None, 0, 0.0)
    assert line == r"energy_rule,rule=r,scope=group:a\ b,site=s state=0i 0"


def test_event_line_escapes_message() -> None:
    line = event_line("irk-01", "order.issued", "", 'off "rack\\7"\nnow', 1.0)
    assert line == (r'energy_event,kind=order.issued,site=irk-01 message="off \"rack\\7\" now" '
                    "1000000000")


def test_rule_line_checks_state() -> None:
    with pytest.raises(ValueError, match="state_int"):
        rule_line("s", "r", "site", 1.0, 2.0, 0.5, None, 3, 0.0)


def test_translate_status() -> None:
    assert isinstance(translate_status(400, "bad", None), ExportRejectedError)
    assert isinstance(translate_status(413, "too big", None), ExportRejectedError)
    assert isinstance(translate_status(422, "type conflict", None), ExportRejectedError)
    refused = translate_status(401, "unauthorized", None)
    assert isinstance(refused, ExportRefusedError) and refused.auth
    missing = translate_status(404, "bucket not found", None)
    assert isinstance(missing, ExportRefusedError) and not missing.auth
    busy = translate_status(429, "slow down", "12")
    assert isinstance(busy, ExportUnavailableError) and busy.retry_after_s == 12.0
    # Retry-After may be an HTTP date
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    down = translate_status(503, "maintenance", later)
    assert isinstance(down, ExportUnavailableError)
    assert down.retry_after_s is not None and 0 < down.retry_after_s <= 120
    # only 429/503 carry Retry-After; other 5xx back off on their own schedule
    other = translate_status(500, "oops", "5")
    assert isinstance(other, ExportUnavailableError) and other.retry_after_s is None
