"""Back-pressure between paho's network thread and the intake worker (monitor.intake.flow).

The claim: with Receive Maximum ``R`` and a queue of ``R + batch`` where QoS 0 may use
only ``batch``, a QoS >= 1 message always finds room while the broker keeps to Receive
Maximum, so the network thread keeps answering the broker (keepalive) however fast
devices publish and however long the store stalls.  A broker that does not keep to it
(Debian's mosquitto 2.0.11 does not, when it drains a backlog) is held back by TCP: the
thread reads nothing while the queue is full, and goes on writing.
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
import pytest
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


def _flood(port: int, seconds: float, qos1: int, qos0: int, base: float) -> None:
    """Publish ``qos1`` QoS 1 and ``qos0`` QoS 0 readings, paced over ``seconds``.  Message
    ``i`` is QoS 0 when ``i % 10 == 0``; its device time is ``base + i / 1000`` s, so a
    committed row tells which message it came from."""
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bp-pub", protocol=paho.MQTTv5)
    pub.max_inflight_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    total = qos1 + qos0
    t0 = time.monotonic()
    infos = []
    for i in range(total):
        qos = 1 if i % (total // qos0 if qos0 else total + 1) else 0
        body = {"meter": f"m{i % 500}", "ts": base + i / 1000, "energy_kwh": i * 0.001}
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
    answers and pings), the queue stays within its bound, nothing blocks.  When the
    lock goes the broker drains its backlog (mosquitto 2.0.11 then ignores Receive
    Maximum): still one connection, every QoS 1 reading committed exactly once, and
    every QoS 0 message either read or counted as refused."""
    broker = Mosquitto(tmp_path / "broker").start()
    base = time.time() - 3600.0  # device times an hour old: kept as sent
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
        flood = threading.Thread(target=_flood, args=(broker.port, seconds, qos1, qos0, base))
        flood.start()
        # while flooded and stalled, the network thread still carries our own traffic
        watcher, echo = _echo_watcher(broker.port)
        time.sleep(seconds / 2)
        link.publish("bp-echo", b"alive", qos=1)
        assert echo.get(timeout=10) == b"alive"
        flood.join(120)
        time.sleep(4.0)  # well past 1.5 x keepalive since the window filled
        assert link.connected.is_set()
        assert metrics.mqtt_connects._value.get() == 1  # never reconnected
        assert q.high_water <= q.maxsize
        # while nothing is acknowledged the broker keeps the window: no put found the
        # queue full, reading never paused
        assert metrics.queue_blocked._value.get() == 0
        assert metrics.read_paused._value.get() == 0

        locker.execute("COMMIT")
        locker.close()

        store_r = sqlite3.connect(str(cfg.storage.path))

        def rows() -> list[int]:
            """The message index of every committed reading."""
            return [round((ts - base) * 1000) for (ts,) in
                    store_r.execute("SELECT ts FROM readings")]

        deadline = time.monotonic() + 180
        while sum(1 for i in rows() if i % 10) < qos1 and time.monotonic() < deadline:
            time.sleep(0.5)
        while q.qsize() and time.monotonic() < deadline:  # the QoS 0 tail
            time.sleep(0.2)
        time.sleep(1.0)
        got = rows()
        dropped = store_r.execute(
            "SELECT coalesce(sum(n), 0) FROM intake_outcomes"
            " WHERE outcome = 'ignored' AND reason = 'queue_full'").fetchone()[0]
        store_r.close()
        seen = {"dropped_metric": metrics.queue_dropped._value.get(),
                "received_metric": metrics.messages_received._value.get(),
                "connects": metrics.mqtt_connects._value.get(),
                "pauses": metrics.read_paused._value.get(), "refused": link.overflows}
        watcher.disconnect()
        watcher.loop_stop()
        intake.stop()
        worker.join(30)
        link.close()
        store.close()
    finally:
        broker.stop()
    read1 = sorted(i for i in got if i % 10)
    read0 = [i for i in got if not i % 10]
    # every QoS 1 reading exactly once, after a drain the broker did not pace
    assert read1 == [i for i in range(n) if i % 10], seen
    assert len(set(read0)) == len(read0), seen
    # every QoS 0 message read or counted as refused (this broker drops none itself)
    assert len(read0) + dropped == qos0, (len(read0), dropped, seen)
    assert dropped > 0  # the QoS 0 share filled up while the worker was stuck
    assert seen["connects"] == 1 and seen["refused"] == 0, seen


def _echo_watcher(port: int) -> tuple[paho.Client, queue.Queue[bytes]]:
    """Another client that receives what the daemon's link publishes to ``bp-echo``:
    proof that the network thread still writes."""
    echo: queue.Queue[bytes] = queue.Queue()
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="bp-watch",
                          protocol=paho.MQTTv5)
    watcher.on_message = lambda c, u, m: echo.put(bytes(m.payload))
    watcher.connect("127.0.0.1", port)
    watcher.subscribe("bp-echo", qos=1)
    watcher.loop_start()
    return watcher, echo


def _fill(q: IntakeQueue, base: float) -> None:
    """Fill the queue by hand (as a broker that ignores Receive Maximum would) with
    QoS 0 readings of meter ``filler``: the worker commits them and acknowledges none."""
    for k in range(q.maxsize - q.qsize()):
        body = json.dumps({"meter": "filler", "ts": base + k, "energy_kwh": k * 0.001})
        q.put_nowait(Message("bp/filler", body.encode(), time.time()))


def _publish_qos1(port: int, count: int, base: float) -> None:
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bp-pub1", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish(f"bp/{k % 5}", json.dumps(
        {"meter": f"r{k % 5}", "ts": base + k, "energy_kwh": k * 0.01}), qos=1)
        for k in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    pub.disconnect()
    pub.loop_stop()


def _committed(path: Path, meter_like: str) -> list[float]:
    with sqlite3.connect(str(path)) as c:
        return sorted(r[0] for r in c.execute(
            "SELECT ts FROM readings WHERE meter LIKE ?", (meter_like,)))


def _wait_committed(path: Path, meter_like: str, count: int) -> list[float]:
    deadline = time.monotonic() + 30
    while len(_committed(path, meter_like)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # and nothing more comes
    return _committed(path, meter_like)


@pytest.mark.parametrize("pause_s", [2.0, 14.0], ids=["short", "longer-than-keepalive"])
def test_a_full_queue_pauses_reading_while_writes_and_keepalive_go_on(
        tmp_path: Path, pause_s: float) -> None:
    """The queue is full (as when a broker ignores Receive Maximum) and QoS 1 readings
    arrive: the network thread reads nothing, refuses nothing and never blocks; our
    own publications still go out.  Once the worker makes room, every reading is
    committed exactly once.  A pause shorter than the keepalive keeps the connection;
    a longer one ends it (the PINGRESP waits behind unread messages), and the
    persistent session re-delivers what was not acknowledged: still exactly once."""
    broker = Mosquitto(tmp_path / "broker").start()
    base = time.time() - 600.0
    try:
        cfg = _config(tmp_path, broker.port)  # keepalive_s = 5
        metrics = Metrics()
        q = IntakeQueue(RECEIVE_MAXIMUM + BATCH, reserved=RECEIVE_MAXIMUM)
        store = Store(cfg.storage.path)
        link = MqttLink(cfg, q, metrics, subscriptions(cfg))
        intake = Intake(cfg, store, metrics, ack=link.ack, queue=q)
        link.start()
        assert link.connected.wait(10)
        time.sleep(0.5)  # subscribed
        _fill(q, base)
        sent = 20
        _publish_qos1(broker.port, sent, base)
        watcher, echo = _echo_watcher(broker.port)
        time.sleep(1.0)
        assert metrics.read_paused._value.get() >= 1  # reading stopped
        assert q.qsize() == q.maxsize and link.overflows == 0  # nothing read, nothing refused
        link.publish("bp-echo", b"while paused", qos=1)
        assert echo.get(timeout=10) == b"while paused"  # the network thread still writes
        time.sleep(pause_s - 1.0)
        connects_paused = metrics.mqtt_connects._value.get()

        worker = threading.Thread(target=intake.run, daemon=True)
        worker.start()  # room at last
        fillers = _wait_committed(cfg.storage.path, "filler", q.maxsize)
        readings = _wait_committed(cfg.storage.path, "r%", sent)
        seen = {"connects": metrics.mqtt_connects._value.get(),
                "pauses": metrics.read_paused._value.get(), "refused": link.overflows}
        watcher.disconnect()
        watcher.loop_stop()
        intake.stop()
        worker.join(30)
        link.close()
        store.close()
    finally:
        broker.stop()
    assert len(fillers) == RECEIVE_MAXIMUM + BATCH
    assert readings == [base + k for k in range(sent)], seen  # each exactly once
    assert seen["refused"] == 0
    if pause_s < cfg.mqtt.keepalive_s:
        assert connects_paused == 1 and seen["connects"] == 1, seen
    else:
        assert seen["connects"] >= 2, seen  # paho's keepalive ended the paused connection


def test_a_put_that_still_finds_the_queue_full_costs_a_bounded_wait_and_a_reconnect(
        tmp_path: Path) -> None:
    """A packet is read only while the queue has room, so only a STOP sentinel put by
    another thread meanwhile can take the last place (or a paho without the lean
    path, which reads regardless).  The network thread then waits at most
    ``OVERFLOW_WAIT_S``, takes nothing more on that connection and reconnects; the
    message is left unacknowledged for the session to re-deliver."""
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
