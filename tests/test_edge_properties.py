"""Property tests for bad input at the MQTT edge, through the real intake worker and store.

``tests/test_parser_properties.py`` feeds the parsers directly; here every
message goes through :meth:`Intake.handle` (routing, size limit, parsers,
accounting, one store commit), with what the parser tests do not cover:
payloads over ``intake.max_payload_bytes``, deeply nested JSON, bytes that are
not UTF-8, and topics with wildcards or control characters.

The properties: no exception escapes; each message ends as readings, as an
availability update, as a counted ``ignored`` outcome or as a dead letter whose
reason is a known one, kept in the store with its topic; a topic a device could
not have published (wildcards, control characters) is never read as a meter.
"""

from __future__ import annotations

import json
import time
import tomllib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import config
from monitor.core.model import Message
from monitor.intake.parsers import REASONS
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.store.ledger import Store
from sim import simulate

MAX_BYTES = 2048
FLEET = simulate.Fleet.build(8, simulate.FORMATS, site="edge", seed=5)
CONFIG = config.parse(tomllib.loads(f"""
[site]
id = "edge"
category = "legal_entity"
timezone = "Europe/Berlin"
[intake]
max_payload_bytes = {MAX_BYTES}
{simulate.config_snippet(FLEET)}
[[sources]]
topic = "#"
format = "json"
"""))
#: reasons the worker itself gives, besides the parsers' own
EDGE_REASONS = {"unknown_topic", "too_large", "parser_error", "internal_error",
                "no_measurement", "bad_topic", "device_id_collision", "too_many_meters",
                "unconfigured"}

REAL_TOPICS = sorted({t.replace("+", n) for t, _ in FLEET.sources()
                      for n in ("rig-001", "shellyplus1pm-rig-004", "x")})
BAD_CHARS = st.sampled_from(["+", "#", "\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\u0085",
                             "\u2028"])
#: odd but legal in a topic: read like any other
ODD_CHARS = st.sampled_from([" ", "\ufeff", "é", "\U0001f600", "//", "$"])


@st.composite
def bad_topics(draw: st.DrawFn, chars: st.SearchStrategy[str] = BAD_CHARS) -> str:
    """A real topic with a wildcard or a control character put into it somewhere."""
    topic = draw(st.sampled_from(REAL_TOPICS))
    at = draw(st.integers(0, len(topic)))
    return topic[:at] + draw(chars) + topic[at:]


def nested(depth: int, leaf: str) -> str:
    return '{"meter": "deep", "power_w": ' + "[" * depth + leaf + "]" * depth + "}"


PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=MAX_BYTES + 1, max_size=MAX_BYTES * 3),  # oversized
    st.integers(1, 5000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.integers(1, 3000).map(lambda d: nested(d, "1").encode()[:MAX_BYTES]),
    st.integers(1, 3000).map(lambda d: ('{"a":' * d + "1" + "}" * d).encode()),
    st.sampled_from([b"\xff\xfe\x00", b"\xc3\x28", b'{"meter": "\xff", "power_w": 1}',
                     b"\xed\xa0\x80", b"12\x80", "3512".encode("utf-16")]),
    st.builds(lambda v: json.dumps({"meter": "m", "power_w": v}).encode(),
              st.one_of(st.floats(allow_nan=True), st.text(max_size=8), st.none())),
)


def _parsers_availability(intake: Intake, msg: Message) -> bool:
    """Whether the parser of the message's source read it as availability only."""
    src = intake._route_of(msg.topic)
    if src < 0:
        return False
    try:
        result = intake._parsers[src].parse(msg.topic, msg.payload, msg.received_at,
                                            msg.retain)
    except Exception:
        return False
    return bool(result.availability) and not result.readings


def _check_one(intake: Intake, store: Store, msg: Message) -> dict[str, Any]:
    before = store.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    rep = intake.handle([msg])  # raises nothing, whatever the message
    dead = store.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] - before
    outcomes = rep.dead_letters + rep.ignored + (1 if rep.readings else 0)
    assert outcomes <= 1, (msg, rep)
    if outcomes == 0:
        assert _parsers_availability(intake, msg), f"message vanished: {msg!r} {rep}"
    assert dead == rep.dead_letters
    if dead:
        topic, reason, detail = store.conn.execute(
            "SELECT topic, reason, detail FROM dead_letters ORDER BY id DESC LIMIT 1").fetchone()
        assert topic == msg.topic
        assert reason in set(REASONS) | EDGE_REASONS, reason
        assert detail, "a dead letter says why"
    return {"rep": rep, "dead": dead}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(topic=st.one_of(st.sampled_from(REAL_TOPICS), bad_topics(), bad_topics(ODD_CHARS)),
       payload=PAYLOADS,
       retain=st.booleans(), dup=st.booleans())
def test_bad_payloads_and_topics_never_escape(tmp_path_factory: Any, topic: str,
                                              payload: bytes, retain: bool, dup: bool) -> None:
    store = Store(tmp_path_factory.mktemp("edge") / "m.db")
    try:
        intake = Intake(CONFIG, store, Metrics())
        msg = Message(topic, payload, time.time(), 1, retain, dup, 7)
        got = _check_one(intake, store, msg)
        if len(payload) > MAX_BYTES and intake._route_of(topic) >= 0:
            assert got["dead"] == 1
            reason = store.conn.execute("SELECT reason FROM dead_letters").fetchone()[0]
            assert reason in ("too_large", "bad_topic"), reason
    finally:
        store.close()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=bad_topics(), power=st.floats(0, 5000, allow_nan=False))
def test_a_topic_no_device_could_publish_is_never_a_meter(tmp_path_factory: Any, topic: str,
                                                          power: float) -> None:
    """A wildcard or a control character in a topic: a dead letter, not a meter named
    with it (it would reach logs, the status page and line protocol)."""
    store = Store(tmp_path_factory.mktemp("edge") / "m.db")
    try:
        intake = Intake(CONFIG, store, Metrics())
        payload = json.dumps({"meter": "rig-001", "power_w": power, "energy_kwh": 1.0})
        rep = _check_one(intake, store, Message(topic, payload.encode(), time.time(), 1))["rep"]
        assert rep.readings == 0 and rep.dead_letters == 1, (topic, rep)
    finally:
        store.close()
