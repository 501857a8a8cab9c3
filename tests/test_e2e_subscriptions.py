"""Subscriptions against a real mosquitto: a message matched by two filters is processed
once, and a filter removed from the config stops delivering from the persistent session."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.daemon import (
    Daemon,
    publisher,
    query,
    wait_for,
    wait_up,
    write_config,
)
from tests.servers import Mosquitto


def _count(cfg: Path, sql: str) -> int:
    rows = query(cfg, sql)
    return int(rows[0][0] or 0) if rows else 0


def _publish(port: int, items: list[tuple[str, dict[str, object]]]) -> None:
    pub = publisher(port)
    for topic, body in items:
        pub.publish(topic, json.dumps(body), qos=1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()


def test_a_topic_matched_by_two_sources_is_accounted_once(broker: Mosquitto,
                                                          tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d.toml", broker.port, """
[[sources]]
topic = "site/#"
format = "json"
[[sources]]
topic = "site/+/energy"
format = "json"
""")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_up(cfg, 30)
        time.sleep(1.0)
        now = time.time()
        _publish(broker.port, [("site/r1/energy", {"meter": "r1", "ts": now - 30 + i * 10,
                                                  "energy_kwh": 10 + i * 0.01})
                               for i in range(3)])
        wait_for(lambda: _count(cfg, "SELECT sum(n) FROM intake_outcomes"
                                " WHERE reason = 'overlapping_subscription'") >= 3,
                 30, what="second copies counted")
        assert _count(cfg, "SELECT count(*) FROM readings WHERE meter = 'r1'") == 3
        assert _count(cfg, "SELECT sum(mwh) FROM ledger WHERE meter = 'r1'") == 20_000
        assert _count(cfg, "SELECT count(*) FROM dead_letters") == 0
    finally:
        daemon.stop()


def test_a_filter_removed_from_the_config_is_unsubscribed(broker: Mosquitto,
                                                          tmp_path: Path) -> None:
    both = """
[[sources]]
topic = "keep/#"
format = "json"
[[sources]]
topic = "gone/#"
format = "json"
"""
    cfg = write_config(tmp_path / "d.toml", broker.port, both)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    wait_up(cfg, 30)
    time.sleep(1.0)
    daemon.stop()
    kept = both.split("[[sources]]\ntopic = \"gone", maxsplit=1)[0]
    write_config(tmp_path / "d.toml", broker.port, kept)
    daemon.start()
    try:
        wait_for(lambda: "unsubscribing" in (tmp_path / "daemon.log").read_text(), 30,
                 what="stale filter unsubscribed")
        time.sleep(0.5)
        now = time.time()
        _publish(broker.port, [("gone/x", {"meter": "x", "ts": now, "power_w": 1.0}),
                               ("keep/k", {"meter": "k", "ts": now, "power_w": 1.0})])
        wait_for(lambda: _count(cfg, "SELECT count(*) FROM readings WHERE meter = 'k'") == 1,
                 30, what="marker committed")
        time.sleep(0.5)
        # the broker no longer delivers the removed filter: no dead letter unknown_topic
        assert _count(cfg, "SELECT count(*) FROM dead_letters") == 0
        assert _count(cfg, "SELECT count(*) FROM readings WHERE meter = 'x'") == 0
    finally:
        daemon.stop()
