"""A dead intake thread stops the daemon with a failure, never leaves it running.

The fault is real, not injected: a native JSON batch from a power-only meter with
two readings of 1.7e308 W (finite, so the parser accepts them) makes the trapezoid
integral infinite, and booking it raises ``OverflowError`` inside the worker
(outside every handled error; a defect noted in the report, left in place so that
this path stays tested by a real payload).  The daemon must log the traceback,
exit non-zero by itself (systemd's ``Restart=on-failure``) and acknowledge
nothing it did not commit: every published message is either a committed reading
or still queued for the daemon's persistent session at the broker.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from monitor import config
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.store.ledger import Store
from tests.daemon import Daemon, publisher, query, wait_for, write_config
from tests.servers import Mosquitto

BODY = """
[[sources]]
topic = "in/json/#"
format = "json"
"""


def _redelivered(port: int, client_id: str, quiet_s: float = 3.0) -> list[bytes]:
    """What the broker still holds for the daemon's persistent session."""
    got: list[bytes] = []
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with lock:
            got.append(bytes(msg.payload))
            last[0] = time.monotonic()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", port, clean_start=False)
    c.loop_start()
    try:
        while time.monotonic() - last[0] < quiet_s:
            time.sleep(0.2)
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def test_a_dead_intake_thread_exits_non_zero_and_acknowledges_nothing_uncommitted(
        broker: Mosquitto, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d.toml", broker.port, BODY, site="dead")
    log = tmp_path / "daemon.log"
    d = Daemon(cfg, log).start()
    wait_for(lambda: "started" in log.read_text(), 60, what="daemon started")
    time.sleep(1.0)  # subscribed
    pub = publisher(broker.port)
    now = time.time()

    def good(i: int) -> bytes:
        return json.dumps({"meter": "good", "ts": now - 300 + i * 10,
                           "energy_kwh": 10 + i * 0.01}).encode()

    before = [good(i) for i in range(5)]
    for p in before:
        pub.publish("in/json/good", p, qos=1).wait_for_publish(10)
    wait_for(lambda: len(query(cfg, "SELECT 1 FROM readings WHERE meter = 'good'")) == 5,
             30, what="the first readings committed")
    poison = json.dumps([{"meter": "huge", "ts": now - 20, "power_w": 1.7e308},
                         {"meter": "huge", "ts": now - 10, "power_w": 1.7e308}]).encode()
    after = [good(i) for i in range(5, 10)]
    for p in [poison, *after]:
        pub.publish("in/json/x", p, qos=1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()

    assert d.proc is not None
    rc = d.proc.wait(30)  # by itself: nobody signals it
    d.proc = None
    assert rc == 1, rc
    text = log.read_text()
    assert "intake worker died" in text and "OverflowError" in text, text[-3000:]
    assert "Traceback" in text

    committed = {json.loads(p)["ts"] for p in before + after} & {
        ts for (ts,) in query(cfg, "SELECT ts FROM readings WHERE meter = 'good'")}
    assert not query(cfg, "SELECT 1 FROM readings WHERE meter = 'huge' AND power_w IS NOT NULL "
                          "AND ts = ?", (now - 10,)), "the failing batch was committed"
    held = _redelivered(broker.port, "energy-monitor-dead")
    assert poison in held, "the uncommitted batch was acknowledged"
    for p in before + after:
        ts = json.loads(p)["ts"]
        assert ts in committed or p in held, f"reading at {ts} acknowledged, not committed"
    assert all(json.loads(p)["ts"] in committed for p in before)


def test_the_worker_thread_keeps_its_failure_and_stalled_reports_it(tmp_path: Path) -> None:
    c = config.parse(tomllib.loads('[site]\nid = "s"\ncategory = "individual"\n'
                                   'timezone = "UTC"\n' + BODY))
    st = Store(tmp_path / "m.db")
    acked: list[Message] = []
    intake = Intake(c, st, Metrics(), ack=acked.extend)
    now = time.time()
    poison = json.dumps([{"meter": "huge", "ts": now - 20, "power_w": 1.7e308},
                         {"meter": "huge", "ts": now - 10, "power_w": 1.7e308}]).encode()
    intake.queue.put(Message("in/json/x", poison, now, qos=1, mid=1))
    worker = threading.Thread(target=intake.run, name="intake")
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    assert intake.failure.startswith("OverflowError")
    assert intake.stalled(time.monotonic(), 60.0).startswith("intake: worker died: Overflow")
    assert acked == [] and not st.conn.execute("SELECT 1 FROM readings").fetchall()
    st.close()
