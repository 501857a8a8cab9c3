"""Run the real daemon (``python -m monitor run``) as a subprocess, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, port: int, body: str, *, site: str = "test-site",
                 tz: str = "UTC", extra_site: str = "", http: bool = False,
                 unrated_max_kw: float | None = None) -> Path:
    """A daemon config for a test broker: ``body`` holds sources/meters/rules.

    ``unrated_max_kw`` lifts the plausibility bound of meters without ``rated_kw``
    for tests that publish a counter's increments milliseconds apart.
    """
    db = path.parent / "monitor.db"
    if unrated_max_kw is not None:
        line = f"unrated_max_kw = {unrated_max_kw:g}"
        body = (body.replace("[intake]", "[intake]\n" + line, 1) if "[intake]" in body
                else body + f"\n[intake]\n{line}\n")
    path.write_text(
        f"""
[site]
id = "{site}"
timezone = "{tz}"
{extra_site if "category" in extra_site else 'category = "legal_entity"' + chr(10) + extra_site}

[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "energy-monitor-{site}"
reconnect_min_s = 1
reconnect_max_s = 2

[storage]
path = "{db}"

[http]
enabled = {"true" if http else "false"}
listen = "127.0.0.1:0"

{body}
"""
    )
    return path


#: every daemon started by a test; the autouse fixture in conftest.py kills survivors,
#: so a failing assertion never leaves a daemon running after its test
STARTED: list[Daemon] = []


class Daemon:
    """A daemon subprocess.  ``start()``, ``stop()`` (SIGTERM) or ``kill()`` (SIGKILL)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(self.config)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        fh.close()
        STARTED.append(self)
        return self

    def stop(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def db_path(config: Path) -> Path:
    return config.parent / "monitor.db"


def query(config: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    path = db_path(config)
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=30)
    try:
        return list(conn.execute(sql, params))
    except sqlite3.OperationalError:
        return []  # not migrated yet
    finally:
        conn.close()


def wait_for(pred: Any, timeout_s: float = 60, interval_s: float = 0.2, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or pred}")


def wait_up(config: Path, timeout_s: float = 60) -> None:
    """Wait until the daemon of ``config`` has its store open *and* is subscribed: its
    retained ``online`` presence follows its SUBSCRIBE packets on the same
    connection, so a reading published after it is not published to nobody."""
    wait_for(lambda: query(config, "SELECT 1 FROM schema_migrations"), timeout_s,
             what="daemon's store")
    doc = tomllib.loads(config.read_text())
    topic = f"energy-monitor/{doc['site']['id']}/status"
    online = threading.Event()

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        if m.payload == b"online":
            online.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", int(doc["mqtt"]["port"]))
    c.subscribe(topic, qos=1)
    c.loop_start()
    try:
        if not online.wait(timeout_s):
            raise AssertionError(f"timed out after {timeout_s}s waiting for {topic} online")
    finally:
        c.disconnect()
        c.loop_stop()


def publisher(port: int, client_id: str = "") -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def status_json(config: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "monitor", "status", "--json", "--config", str(config)],
        capture_output=True, env=env, cwd=ROOT, check=True, timeout=60)
    return dict(json.loads(out.stdout))
