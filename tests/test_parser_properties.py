"""Property tests for every parser: no exception escapes, every message has one outcome.

Whatever the topic and payload, a parser returns readings, availability or an
``ignored`` outcome with a known reason, or raises ParseError with a known
reason (a dead letter).  Energy counters are never negative and every value is
finite.
"""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.core.model import ParseError
from monitor.intake.parsers import FORMATS, IGNORE_REASONS, REASONS, DiscoveryRegistry, make_parser

SEGMENTS = st.sampled_from([
    "tele", "stat", "cmnd", "SENSOR", "LWT", "STATE", "shellies", "relay", "emeter", "0", "1",
    "power", "energy", "total", "total_returned", "events", "rpc", "status", "switch:0",
    "emdata:0", "online", "zigbee2mqtt", "bridge", "availability", "set", "sensor", "state",
    "emon", "emontx4", "P1", "E1", "mbmd", "sdm1-1", "Power", "Import", "Sum", "L1", "rig-07",
    "hall/a", "", "homeassistant", "config",
])
TOPICS = st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
KEYS = st.sampled_from([
    "ENERGY", "Total", "Power", "Today", "ExportActive", "ImportActive", "SML", "Total_in",
    "meter", "power_w", "energy_kwh", "export_kwh", "ts", "seq", "method", "params", "src",
    "switch:0", "apower", "aenergy", "em:0", "a_act_power", "emdata:0", "a_total_act_energy",
    "power", "energy", "power_l1", "energy_a", "energy_flow_a", "energy_produced_a",
    "last_seen", "P1", "E1", "powerL1", "time", "Vrms", "state", "Time", "Epoch",
])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(KEYS, inner, max_size=6)),
    max_leaves=20,
)


def _payload(value: object) -> bytes:
    try:
        return json.dumps(value).encode()
    except (ValueError, TypeError):
        return b"{}"


PAYLOADS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"nan", b"-1", b"0", b"1.5", b"None", b"online", b"offline", b"true", b""]),
    JSON.map(_payload),
)


def _check(fmt: str, topic: str, payload: bytes) -> None:
    parser = make_parser(fmt, None, DiscoveryRegistry("homeassistant"), None)
    try:
        res = parser.parse(topic, payload, 1_800_000_000.0)
    except ParseError as exc:
        assert exc.reason in REASONS, exc.reason
        return
    assert res.readings or res.availability or res.ignored, (topic, payload, res)
    if res.ignored:
        assert res.ignored in IGNORE_REASONS or res.ignored in REASONS, res.ignored
        assert not res.readings
    for reason in res.skipped:
        assert reason in IGNORE_REASONS or reason in REASONS, reason
    for r in res.readings:
        assert r.power_w is not None or r.energy_kwh is not None or r.export_kwh is not None
        for v in (r.power_w, r.energy_kwh, r.export_kwh):
            assert v is None or math.isfinite(v)
        for v in (r.energy_kwh, r.export_kwh):
            assert v is None or v >= 0


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(FORMATS), topic=TOPICS, payload=PAYLOADS)
def test_every_message_has_exactly_one_outcome(fmt: str, topic: str, payload: bytes) -> None:
    _check(fmt, topic, payload)


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from(FORMATS), payloads=st.lists(PAYLOADS, min_size=2, max_size=6),
       topic=TOPICS)
def test_state_kept_between_messages_never_breaks_the_contract(
    fmt: str, payloads: list[bytes], topic: str
) -> None:
    """Stateful parsers (Gen2 deltas, mbmd phases, ESPHome ranks) see sequences too."""
    parser = make_parser(fmt, None, DiscoveryRegistry("homeassistant"), None)
    for payload in payloads:
        try:
            res = parser.parse(topic, payload, 1_800_000_000.0)
        except ParseError as exc:
            assert exc.reason in REASONS
            continue
        assert res.readings or res.availability or res.ignored
