"""Back-pressure between paho's network thread and the intake worker (monitor.intake.flow).

The claim: with Receive Maximum ``R`` and a queue of ``R + batch`` where QoS 0 may use
only ``batch``, a QoS >= 1 message always finds room, so the network thread never
waits on the queue and keeps answering the broker (keepalive) however fast devices
publish and however long the store stalls.  Only a broker that breaks Receive
Maximum could fill the queue: then the thread waits a bounded time and reconnects.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as paho
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from monitor import config
from monitor.core.model import Message
from monitor.intake.flow import IntakeQueue
from monitor.intake.mqtt import MqttLink
from monitor.intake.worker import Intake, subscriptions
from monitor.metrics import Metrics
from monitor.store.ledger import Store
from tests.servers import Mosquitto

RATED_MSGS_PER_S = 2000  # the live rate the daemon is rated for (docs/benchmarks.md)
RECEIVE_MAXIMUM = 50
BATCH = 100


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["qos0", "qos1", "take", "ack"]),
                          st.integers(1, 300)), max_size=200))
def test_a_qos1_message_always_finds_room_while_the_broker_keeps_receive_maximum(
        ops: list[tuple[str, int]]) -> None:
    q = IntakeQueue(RECEIVE_MAXIMUM + BATCH, reserved=RECEIVE_MAXIMUM)
    unacked = 0  # QoS 1 messages the broker has out to us: in the queue or being committed
    held: list[object] = []  # taken by the worker, not yet acknowledged
    for op, n in ops:
        for _ in range(n):
            if op == "qos0":
                q.offer_qos0(Message("t", b"0", 0.0))
            elif op == "qos1" and unacked < RECEIVE_MAXIMUM:  # the broker's side of the deal
                q.put_nowait(Message("t", b"1", 0.0, qos=1))  # raises queue.Full if it were full
                unacked += 1
        if op == "take":
            held += q.take(n, 0.0)
        elif op == "ack":
            done, held = held[:n], held[n:]
            unacked -= sum(1 for m in done if isinstance(m, Message) and m.qos == 1)
        assert q.qsize() <= q.maxsize
    assert q.high_water <= q.maxsize


def _config(tmp: Path, port: int) -> config.Config:
    return config.parse(tomllib.loads(f"""
[site]
id = "bp"
category = "individual"
timezone = "UTC"
[mqtt]
port = {port}
client_id = "bp-daemon"
keepalive_s = 5
receive_maximum = {RECEIVE_MAXIMUM}
[storage]
path = "{tmp / 'm.db'}"
[intake]
batch_size = {BATCH}
unrated_max_kw = 1000000
[[sources]]
topic = "bp/#"
format = "json"
"""))


def _flood(port: int, seconds: float, qos1: int, qos0: int) -> None:
    """Publish ``qos1`` QoS 1 and ``qos0`` QoS 0 readings, paced over ``seconds``."""
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bp-pub", protocol=paho.MQTTv5)
    pub.max_inflight_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    total = qos1 + qos0
    t0 = time.monotonic()
    infos = []
    for i in range(total):
        qos = 1 if i % (total // qos0 if qos0 else total + 1) else 0
        body = {"meter": f"m{i % 500}", "ts": 1_790_000_000.0 + i, "energy_kwh": i * 0.001}
        infos.append(pub.publish(f"bp/{i % 500}", json.dumps(body), qos=qos))
        if len(infos) >= 10_000:  # stay well inside the 65,535 packet ids
            for info in infos:
                info.wait_for_publish(60)
            infos.clear()
        ahead = t0 + seconds * (i + 1) / total - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()


def test_a_flood_at_ten_times_the_rated_rate_while_the_store_is_locked(tmp_path: Path) -> None:
    """The worker is stuck on a write-locked store for longer than 1.5 x keepalive while
    devices publish at 10x the rated rate.  The connection survives (paho still
    answers and pings), the queue stays within its bound, nothing blocks; when the lock
    goes, every QoS 1 reading is committed exactly once and every QoS 0 message the
    queue refused is counted."""
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        cfg = _config(tmp_path, broker.port)
        metrics = Metrics()
        q = IntakeQueue(RECEIVE_MAXIMUM + BATCH, reserved=RECEIVE_MAXIMUM)
        store = Store(cfg.storage.path)
        link = MqttLink(cfg, q, metrics, subscriptions(cfg))
        intake = Intake(cfg, store, metrics, ack=link.ack, queue=q)
        link.start()
        assert link.connected.wait(10)
        time.sleep(0.5)  # subscribed
        # another process holds the write lock: every commit waits (busy timeout)
        locker = sqlite3.connect(str(cfg.storage.path), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        worker = threading.Thread(target=intake.run, daemon=True)
        worker.start()

        seconds = 9.0  # > 1.5 x keepalive_s: the broker drops a client that goes quiet
        n = int(10 * RATED_MSGS_PER_S * seconds)
        qos0 = n // 10
        qos1 = n - qos0
        flood = threading.Thread(target=_flood, args=(broker.port, seconds, qos1, qos0))
        flood.start()
        # while flooded and stalled, the network thread still carries our own traffic
        echo: queue.Queue[bytes] = queue.Queue()
        watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="bp-watch",
                              protocol=paho.MQTTv5)
        watcher.on_message = lambda c, u, m: echo.put(bytes(m.payload))
        watcher.connect("127.0.0.1", broker.port)
        watcher.subscribe("bp-echo", qos=1)
        watcher.loop_start()
        time.sleep(seconds / 2)
        link.publish("bp-echo", b"alive", qos=1)
        assert echo.get(timeout=10) == b"alive"
        flood.join(120)
        time.sleep(4.0)  # well past 1.5 x keepalive since the window filled
        assert link.connected.is_set()
        assert metrics.mqtt_connects._value.get() == 1  # never reconnected
        assert q.high_water <= q.maxsize
        assert metrics.queue_blocked._value.get() == 0  # no put ever found the queue full

        locker.execute("COMMIT")
        locker.close()

        def committed() -> int:
            return int(store_r.execute("SELECT count(*) FROM readings").fetchone()[0])

        store_r = sqlite3.connect(str(cfg.storage.path))
        deadline = time.monotonic() + 120
        while committed() < qos1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        readings = committed()
        dropped = store_r.execute(
            "SELECT coalesce(sum(n), 0) FROM intake_outcomes"
            " WHERE outcome = 'ignored' AND reason = 'queue_full'").fetchone()[0]
        dupes = store_r.execute("SELECT count(*) FROM (SELECT meter, ts FROM readings"
                                " GROUP BY meter, ts HAVING count(*) > 1)").fetchone()[0]
        store_r.close()
        # for a failure's message: what the network thread saw
        seen = {"dropped_metric": metrics.queue_dropped._value.get(),
                "received_metric": metrics.messages_received._value.get(),
                "connects": metrics.mqtt_connects._value.get()}
        watcher.disconnect()
        watcher.loop_stop()
        intake.stop()
        worker.join(30)
        link.close()
        store.close()
    finally:
        broker.stop()
    assert dupes == 0
    # every QoS 1 reading exactly once; QoS 0 ones either read or counted as refused
    # (the broker itself may also drop QoS 0 for a client whose window is full)
    assert qos1 <= readings <= qos1 + qos0
    assert readings - qos1 + dropped <= qos0, (readings, dropped, seen)
    assert dropped > 0  # the QoS 0 share filled up while the worker was stuck


def test_a_broker_breaking_receive_maximum_costs_a_bounded_wait_and_a_reconnect(
        tmp_path: Path) -> None:
    """Only a broker that ignores Receive Maximum can fill the queue (a fault mosquitto
    cannot be made to commit: the queue is filled by hand).  The network thread then
    waits at most ``OVERFLOW_WAIT_S``, takes nothing more on that connection and
    reconnects; the message is left unacknowledged for the session to re-deliver."""
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        cfg = _config(tmp_path, broker.port)
        metrics = Metrics()
        q = IntakeQueue(RECEIVE_MAXIMUM + BATCH, reserved=RECEIVE_MAXIMUM)
        link = MqttLink(cfg, q, metrics, subscriptions(cfg))
        link.start()
        assert link.connected.wait(10)
        for _ in range(q.maxsize):
            q.put_nowait(Message("bp/x", b"{}", 0.0, qos=1))
        t = threading.Thread(target=link._deliver,
                             args=("bp/1", b"{}", 1, False, False, 7, ()))
        t.start()
        t.join(10)  # a liveness bound, not a speed: it must return at all
        assert not t.is_alive()
        assert q.qsize() == q.maxsize
        assert link.overflows == 1
        assert metrics.queue_blocked._value.get() == 1
        deadline = time.monotonic() + 20
        while metrics.mqtt_connects._value.get() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metrics.mqtt_connects._value.get() == 2  # reconnected, session kept
        link.close()
    finally:
        broker.stop()
