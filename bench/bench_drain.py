"""Drain benchmark: 200,000 QoS 1 readings queued by the broker for a stopped client,
drained by the daemon and by a bare paho client that only counts, in the same run.

Also: peak RSS of the daemon after it has seen 10,000 distinct meters.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemon import Daemon, query, wait_for, write_config
from tests.servers import Mosquitto

TOPIC = "bench/{}"


def _session_client(port: int, client_id: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    return c


def _register_bare(port: int) -> None:
    c = _session_client(port, "bare-counter")
    c.loop_start()
    c.subscribe("bench/#", qos=1)
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()


def publish(port: int, n: int, meters: int, start_ts: float = 1_700_000_000.0) -> float:
    """Publish ``n`` native-JSON counter readings round-robin over ``meters``; returns seconds."""
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=paho.MQTTv5)
    pub.max_inflight_messages_set(10000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    t0 = time.perf_counter()
    pending: list[paho.MQTTMessageInfo] = []
    for i in range(n):
        m = i % meters
        k = i // meters
        payload = json.dumps({"meter": f"m{m:05d}", "ts": start_ts + k * 10.0,
                              "power_w": 3000.0, "energy_kwh": round(k * 3000 * 10 / 3.6e6, 6)})
        pending.append(pub.publish(TOPIC.format(m), payload, qos=1))
        if len(pending) >= 15000:  # stay well below the 65,535 message-id space
            for info in pending:
                info.wait_for_publish(60)
            pending.clear()
    for info in pending:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - t0
    pub.disconnect()
    pub.loop_stop()
    return elapsed


def drain_bare(port: int, n: int) -> float:
    got = 0
    done = threading.Event()

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    t0 = time.perf_counter()
    c = _session_client(port, "bare-counter")
    c.on_message = on_message
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"bare client got only {got} of {n}")
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(workdir: Path, n: int = 200_000, meters: int = 100) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir / "broker", max_queued=0).start()
    try:
        cfg = write_config(workdir / "daemon.toml", broker.port, """
[[sources]]
topic = "bench/#"
format = "json"
[intake]
batch_size = 2000
""")
        d = Daemon(cfg, workdir / "daemon.log").start()
        wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30, what="daemon up")
        time.sleep(1.0)  # subscribed with a persistent session
        d.stop()
        _register_bare(broker.port)
        pub_s = publish(broker.port, n, meters)
        bare_s = drain_bare(broker.port, n)
        t0 = time.perf_counter()
        d.start()
        wait_for(lambda: (query(cfg, "SELECT count(*) FROM readings") or [(0,)])[0][0] >= n,
                 900, 0.05, "daemon drained")
        daemon_s = time.perf_counter() - t0
        rows = query(cfg, "SELECT count(*), sum(delta_kwh) FROM readings")[0]
        d.stop()
        result: dict[str, Any] = {
            "messages": n,
            "meters": meters,
            "publish_s": round(pub_s, 3),
            "bare_paho_s": round(bare_s, 3),
            "bare_paho_msgs_per_s": round(n / bare_s),
            "daemon_s": round(daemon_s, 3),
            "daemon_msgs_per_s": round(n / daemon_s),
            "daemon_vs_bare_ratio": round(bare_s / daemon_s, 3),
            "target_ratio": 0.5,
            "readings_committed": rows[0],
        }
    finally:
        broker.stop()
    result["rss_10k_meters"] = rss_10k(workdir / "rss")
    return result


def rss_10k(workdir: Path, meters: int = 10_000, per_meter: int = 5) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir / "broker", max_queued=0).start()
    try:
        cfg = write_config(workdir / "daemon.toml", broker.port,
                           '[[sources]]\ntopic = "bench/#"\nformat = "json"\n')
        d = Daemon(cfg, workdir / "daemon.log").start()
        wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30, what="daemon up")
        time.sleep(1.0)
        publish(broker.port, meters * per_meter, meters)
        wait_for(lambda: (query(cfg, "SELECT count(*) FROM readings") or [(0,)])[0][0]
                 >= meters * per_meter, 600, 0.1, "daemon drained")
        assert d.proc is not None
        rss = _peak_rss_kib(d.proc.pid)
        d.stop()
    finally:
        broker.stop()
    return {"meters": meters, "readings": meters * per_meter, "peak_rss_mib": round(rss / 1024, 1)}
