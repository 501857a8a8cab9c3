"""Bad input never stops the stream: each malformed payload is dead-lettered with a reason,
counted, and good readings around it are still accounted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.daemon import (
    Daemon,
    publisher,
    query,
    wait_for,
    wait_up,
    write_config,
)
from tests.servers import Mosquitto

SOURCES = """
[[sources]]
topic = "in/json/#"
format = "json"
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"
[[sources]]
topic = "shellies/#"
format = "shelly_gen1"
[[sources]]
topic = "node1/sensor/+/state"
format = "esphome"
[[sources]]
topic = "mbmd/#"
format = "mbmd"
[[sources]]
topic = "emon/#"
format = "emonhub"
[[sources]]
topic = "zigbee2mqtt/#"
format = "zigbee2mqtt"
[[sources]]
topic = "gen2/#"
format = "shelly_gen2"
[intake]
max_payload_bytes = 4096
"""

# (what, topic, payload, expected dead-letter reason)
BAD: list[tuple[str, str, bytes, str]] = [
    ("not JSON", "in/json/a", b"{not json", "not_json"),
    ("empty", "in/json/a", b"", "empty"),
    ("binary", "in/json/a", bytes(range(256)), "not_utf8"),
    ("not UTF-8", "in/json/a", b"\xff\xfe\xfd", "not_utf8"),
    ("number as string", "in/json/a", b'{"meter": "good", "power_w": "3200"}', "wrong_type"),
    ("unit in value", "in/json/a", b'{"meter": "good", "power_w": "3.2 kW"}', "wrong_type"),
    ("boolean", "in/json/a", b'{"meter": "good", "power_w": true}', "wrong_type"),
    ("NaN", "in/json/a", b'{"meter": "good", "power_w": NaN}', "nan"),
    ("infinity", "in/json/a", b'{"meter": "good", "energy_kwh": Infinity}', "infinite"),
    ("negative", "in/json/a", b'{"meter": "good", "energy_kwh": -5}', "negative"),
    ("no measurement", "in/json/a", b'{"meter": "good"}', "no_measurement"),
    ("no meter", "in/json/a", b'{"power_w": 5}', "missing_field"),
    ("bad time", "in/json/a", b'{"meter": "good", "ts": "yesterday", "power_w": 1}',
     "bad_timestamp"),
    ("bad batch element", "in/json/a",
     b'[{"meter": "good", "power_w": 1}, {"meter": "good", "power_w": "x"}]', "wrong_type"),
    ("JSON string", "in/json/a", b'"hello"', "wrong_type"),
    ("huge", "in/json/a", b'{"meter": "good", "power_w": 1, "pad": "' + b"x" * 5000 + b'"}',
     "too_large"),
    ("tasmota text power", "tele/pow1/SENSOR", b'{"ENERGY": {"Power": "abc"}}',
     "wrong_type"),
    ("esphome nan", "node1/sensor/power/state", b"nan", "nan"),
    ("esphome None", "node1/sensor/power/state", b"None", "nan"),
    ("shelly unknown topic", "shellies/plug1/weird/0/thing", b"1", "unknown_topic"),
    ("shelly negative energy", "shellies/plug1/relay/0/energy", b"-3", "negative"),
    ("mbmd sentinel -1", "mbmd/sdm1-1/Import", b"-1", "negative"),
    ("emonhub legacy csv", "emon/emontx/P1", b"1,2,3", "not_a_number"),
    ("zigbee2mqtt not an object", "zigbee2mqtt/plug", b"[1, 2]", "wrong_type"),
    ("gen2 not json", "gen2/events/rpc", b"<html>", "not_json"),
]


@pytest.mark.slow
def test_malformed_payloads_are_dead_lettered_and_good_readings_still_count(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "d.toml", broker.port, SOURCES)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_up(cfg, 30)
        time.sleep(1.0)
        pub = publisher(broker.port)
        t0 = time.time() - 3600
        infos = []
        for i, (_what, topic, payload, _reason) in enumerate(BAD):
            good = {"meter": "good", "ts": t0 + i * 10, "energy_kwh": 100 + i * 0.5}
            infos.append(pub.publish("in/json/good", json.dumps(good), qos=1))
            infos.append(pub.publish(topic, payload, qos=1))
        last = {"meter": "good", "ts": t0 + len(BAD) * 10, "energy_kwh": 100 + len(BAD) * 0.5}
        infos.append(pub.publish("in/json/good", json.dumps(last), qos=1))
        for info in infos:
            info.wait_for_publish(10)
        wait_for(lambda: (query(cfg, "SELECT count(*) FROM readings WHERE meter='good'")
                          or [(0,)])[0][0] >= len(BAD) + 1, 60, what="good readings")
        wait_for(lambda: query(cfg, "SELECT count(*) FROM dead_letters")[0][0] >= len(BAD),
                 30, what="dead letters")
        assert daemon.alive()
        rows = query(cfg, "SELECT topic, reason, size, length(payload) FROM dead_letters "
                          "ORDER BY id")
        assert [(r[0], r[1]) for r in rows] == [(b[1], b[3]) for b in BAD]
        assert all(r[3] <= 1024 for r in rows)  # the first bytes are kept, not the whole
        kwh = query(cfg, "SELECT sum(mwh) / 1e6 FROM ledger WHERE meter = 'good'")[0][0]
        assert kwh == pytest.approx(len(BAD) * 0.5)
        # the counters are visible as metrics-ready totals in the store and status
        assert len({r[1] for r in rows}) >= 10
        pub.disconnect()
        pub.loop_stop()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
