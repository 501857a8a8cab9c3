"""Commissioning: a site that goes from dry_run to live in the middle of a ban gets its
shutdown order at the first check, once."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.daemon import Daemon, query, wait_for, write_config
from tests.servers import Mosquitto


def _config(tmp_path: Path, port: int, mode: str) -> Path:
    today = dt.datetime.now(dt.UTC).date()
    body = f"""
[[sources]]
topic = "m/#"
format = "json"
[[meters]]
id = "r1"
device = "r1"
control = {{ kind = "json", topic = "ctl/r1" }}
[schedule]
check_interval_s = 1
[actions]
mode = "{mode}"
[[rules]]
id = "ban"
kind = "ban_window"
dates = [{{from = {today - dt.timedelta(days=1)}, until = {today + dt.timedelta(days=1)}}}]
"""
    return write_config(tmp_path / "d.toml", port, body, site="golive")


@pytest.mark.slow
def test_dry_run_then_live_orders_the_standing_breach_once(broker: Mosquitto,
                                                            tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        with lock:
            seen.append({"topic": m.topic, **json.loads(m.payload)})

    sub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe([("energy-monitor/golive/orders", 1), ("ctl/#", 1)])
    sub.loop_start()
    cfg = _config(tmp_path, broker.port, "dry_run")
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: query(cfg, "SELECT count(*) FROM orders WHERE dry_run = 1")
                 == [(1,)], 30, what="the dry-run order")
        assert d.stop() == 0
        time.sleep(0.5)
        with lock:
            assert seen == []  # dry run published nothing
        _config(tmp_path, broker.port, "live")
        d.start()
        wait_for(lambda: query(cfg, "SELECT count(*) FROM orders WHERE dry_run = 0")
                 == [(1,)], 30, what="the live order of the standing breach")
        wait_for(lambda: len(seen) >= 2, 30, what="order and device command published")
        with lock:
            assert {s["topic"] for s in seen} == {"energy-monitor/golive/orders", "ctl/r1"}
            assert seen[0]["action"] == "shutdown" and seen[0]["rule"] == "ban"
        assert d.stop() == 0
        d.start()  # acted on live once: a further restart orders nothing new
        time.sleep(4.0)
        assert query(cfg, "SELECT count(*) FROM orders WHERE dry_run = 0") == [(1,)]
    finally:
        d.kill()
        sub.disconnect()
        sub.loop_stop()
