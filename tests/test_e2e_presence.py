"""Presence: retained online/offline on energy-monitor/<site>/status, with a last will."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.daemon import Daemon, wait_for, write_config
from tests.servers import Mosquitto


def retained_status(port: int, topic: str) -> str | None:
    """What a newcomer subscribing now is told (the retained message)."""
    got: list[str] = []
    done = threading.Event()

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        if m.retain:
            got.append(m.payload.decode())
        done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    done.wait(1.0)
    c.disconnect()
    c.loop_stop()
    return got[-1] if got else None


def test_online_then_offline_on_clean_stop_and_on_crash(broker: Mosquitto,
                                                         tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d.toml", broker.port,
                       '[[sources]]\ntopic = "x/#"\nformat = "json"\n', site="pres")
    topic = "energy-monitor/pres/status"
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: retained_status(broker.port, topic) == "online", 30, what="online")
        assert d.stop() == 0
        assert retained_status(broker.port, topic) == "offline"
        d.start()
        wait_for(lambda: retained_status(broker.port, topic) == "online", 30, what="online")
        d.kill()  # no goodbye: the broker publishes the last will
        wait_for(lambda: retained_status(broker.port, topic) == "offline", 30,
                 what="last will")
    finally:
        d.kill()
