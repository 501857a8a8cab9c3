"""A dead intake thread stops the daemon with a failure, never leaves it running.

The fault is a defect in the daemon's own code, which no real server can produce,
so it is injected at the process edge: the daemon runs from a small launcher that
replaces ``Store.commit_batch`` with one that raises a non-store error for a batch
holding the meter ``crash`` (the worker's code path is the real one).  The defect
this test first used -- two 1.7e308 W readings overflowing the power integral --
is fixed (the anomaly ``implausible_power``; tests/test_accounting_clock.py), and a
defect while a message is *processed* no longer kills the worker: that message
becomes the dead letter ``internal_error`` (the last test here).  The daemon must
log the traceback, exit non-zero by itself (systemd's ``Restart=on-failure``) and
acknowledge nothing it did not commit: every published message is either a
committed reading or still queued for the daemon's persistent session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from monitor import config
from monitor.core import accounting
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.store.ledger import Store
from tests.daemon import ROOT, STARTED, Daemon, publisher, query, wait_for, write_config
from tests.servers import Mosquitto

LAUNCHER = """
import sys
from monitor.store.ledger import Store
real = Store.commit_batch
def commit_batch(self, b):
    if any(r[0] == "crash" for r in b.readings):
        raise RuntimeError("injected defect in the commit")
    return real(self, b)
Store.commit_batch = commit_batch
from monitor.app.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


class CrashingDaemon(Daemon):
    """The real daemon, started through :data:`LAUNCHER`."""

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(self.config)],
                                         stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT)
        STARTED.append(self)
        return self


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
    d = CrashingDaemon(cfg, log).start()
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
    poison = json.dumps([{"meter": "crash", "ts": now - 20, "power_w": 10.0},
                         {"meter": "crash", "ts": now - 10, "power_w": 10.0}]).encode()
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
    assert "intake worker died" in text and "injected defect" in text, text[-3000:]
    assert "Traceback" in text

    committed = {json.loads(p)["ts"] for p in before + after} & {
        ts for (ts,) in query(cfg, "SELECT ts FROM readings WHERE meter = 'good'")}
    assert not query(cfg, "SELECT 1 FROM readings WHERE meter = 'crash'"), \
        "the failing batch was committed"
    held = _redelivered(broker.port, "energy-monitor-dead")
    assert poison in held, "the uncommitted batch was acknowledged"
    for p in before + after:
        ts = json.loads(p)["ts"]
        assert ts in committed or p in held, f"reading at {ts} acknowledged, not committed"
    assert all(json.loads(p)["ts"] in committed for p in before)


def _intake(tmp_path: Path) -> tuple[Intake, Store, list[Message]]:
    """An intake on a fresh store, with the messages it acknowledges."""
    c = config.parse(tomllib.loads('[site]\nid = "s"\ncategory = "individual"\n'
                                   'timezone = "UTC"\n' + BODY))
    st = Store(tmp_path / "m.db")
    acked: list[Message] = []
    return Intake(c, st, Metrics(), ack=acked.extend), st, acked


def test_the_worker_thread_keeps_its_failure_and_stalled_reports_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> None:
        raise OverflowError("injected defect")

    monkeypatch.setattr(Store, "commit_batch", broken)
    intake, st, acked = _intake(tmp_path)
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


def test_a_message_that_makes_processing_fail_is_a_dead_letter_and_the_rest_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect in accounting raised by one message: the batch is put back and taken
    one message at a time; that message is the dead letter internal_error, the
    others are committed once and acknowledged, and the worker runs on."""
    real = accounting.apply

    def apply(state: accounting.MeterState, r: object, params: accounting.MeterParams,
              retained: bool = False) -> accounting.Outcome:
        if getattr(r, "device", "") == "crash":
            raise RuntimeError("injected defect in accounting")
        return real(state, r, params, retained)  # type: ignore[arg-type]

    monkeypatch.setattr(accounting, "apply", apply)
    intake, st, acked = _intake(tmp_path)
    now = time.time()

    def msg(mid: int, meter: str, i: int) -> Message:
        body = json.dumps({"meter": meter, "ts": now - 100 + i, "energy_kwh": 5 + i * 0.01})
        return Message(f"in/json/{meter}", body.encode(), now, qos=1, mid=mid)

    first = [msg(1, "a", 0), msg(2, "b", 0)]
    intake.handle(first)
    # a batch where a and b move on, and one message of "crash" in between
    batch = [msg(3, "a", 1), msg(4, "crash", 1), msg(5, "b", 1), msg(6, "a", 2)]
    intake.handle(batch)
    assert [m.mid for m in acked] == [1, 2, 3, 4, 5, 6]
    dead = st.conn.execute("SELECT topic, reason FROM dead_letters").fetchall()
    assert dead == [("in/json/crash", "internal_error")]
    got = dict(st.conn.execute("SELECT meter, sum(mwh) FROM ledger GROUP BY meter"))
    # a: 5.00 -> 5.01 -> 5.02 (20 Wh), b: 5.00 -> 5.01 (10 Wh), in mWh: each delta once
    assert got == {"a": 20_000, "b": 10_000}, got
    assert intake.failure == "" and intake.stalled(time.monotonic(), 60.0) == ""
    st.close()
