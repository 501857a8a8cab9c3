"""The systemd unit (scored, verified) and the daemon's sd_notify protocol, end to end.

The daemon runs as a real subprocess with a ``NOTIFY_SOCKET`` bound by the test;
the intake is wedged for real by another process (this test) holding a write
transaction on the store, which makes the store writer stop committing.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from monitor.app.sdnotify import Notifier
from tests.daemon import (
    ROOT,
    Daemon,
    db_path,
    publisher,
    query,
    wait_for,
    wait_up,
    write_config,
)
from tests.servers import Mosquitto

UNIT = ROOT / "deploy/systemd/energy-monitor.service"
VENV_PROGRAM = ROOT / ".venv/bin/energy-monitor"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: run scripts/install-deps (as root)")
    return tool


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order, per key (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def exposure(unit: Path) -> float:
    out = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


def verify(unit_text: str, program: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on ``unit_text`` with ExecStart's program at ``program``
    (verify checks that the program exists; the installed path is /opt/...)."""
    settings = unit_settings(unit_text)
    [exec_start] = settings["ExecStart"]
    installed = exec_start.split()[0]
    unit = workdir / "energy-monitor.service"
    unit.write_text(unit_text.replace(f"ExecStart={installed}", f"ExecStart={program}"))
    return subprocess.run([_analyze(), "verify", str(unit)], capture_output=True, text=True,
                          check=False,
                          timeout=60)


def test_unit_is_supervised_and_restarts_on_failure() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert float(s["WatchdogSec"][0]) > 0
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"][0].startswith("/opt/energy-monitor/bin/energy-monitor run ")


def test_unit_hardening_scores_2_or_better_and_docs_say_so() -> None:
    score = exposure(UNIT)
    assert score <= MAX_EXPOSURE
    ops = (ROOT / "docs/operations.md").read_text()
    assert f"**{score:.1f}**" in ops, "docs/operations.md must report the current score"


def test_unit_verifies(tmp_path: Path) -> None:
    assert VENV_PROGRAM.exists(), "make deps creates .venv/bin/energy-monitor"
    res = verify(UNIT.read_text(), VENV_PROGRAM, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting and a missing program are reported."""
    res = verify(UNIT.read_text().replace("Restart=on-failure", "Restart=on-falure"),
                 tmp_path / "no-such-program", tmp_path)
    assert res.returncode != 0
    assert "no-such-program" in res.stderr


# ---------------------------------------------------------------------- sd_notify


@dataclass
class NotifySocket:
    """A unix datagram socket standing in for systemd's; records every notification."""

    path: Path
    got: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.got.append((time.monotonic(), fields))

    def messages(self, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, f) for t, f in self.got if t >= since]

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, f in self.messages(since) if f.get("WATCHDOG") == "1"]

    def last_status(self) -> str:
        found = [f["STATUS"] for _, f in self.messages() if "STATUS" in f]
        return found[-1] if found else ""

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    d = Path(tempfile.mkdtemp(prefix="sdn-"))  # short: unix socket paths are <= 107 bytes
    ns = NotifySocket(d / "notify")
    try:
        yield ns
    finally:
        ns.close()
        shutil.rmtree(d, ignore_errors=True)


def _readings(cfg: Path) -> int:
    return int((query(cfg, "SELECT count(*) FROM readings") or [(0,)])[0][0])


def test_daemon_notifies_ready_watchdog_status_and_withholds_pings_when_wedged(
        broker: Mosquitto, tmp_path: Path, notify_socket: NotifySocket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")  # pings every 1.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = write_config(tmp_path / "d.toml", broker.port,
                       '[[sources]]\ntopic = "wd/#"\nformat = "json"\n', http=True)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port)
    try:
        wait_for(lambda: any(f.get("READY") == "1" for _, f in notify_socket.messages()),
                 60, what="READY=1")
        ready = next(f for _, f in notify_socket.messages() if f.get("READY") == "1")
        assert "mqtt" in ready["STATUS"]
        wait_for(lambda: len(notify_socket.pings()) >= 3, 60, what="three WATCHDOG=1")
        wait_for(lambda: notify_socket.last_status().startswith("ok: mqtt connected"), 60,
                 what="STATUS ok")
        for i in range(5):
            pub.publish(f"wd/m{i}", json.dumps({"meter": f"m{i}", "energy_kwh": 1.0 + i}),
                        qos=1).wait_for_publish(10)
        wait_for(lambda: _readings(cfg) == 5, 60, what="five readings committed")

        # wedge: another process holds the store's write lock, so commits cannot finish
        lock = sqlite3.connect(db_path(cfg), timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            for i in range(5):
                pub.publish(f"wd/m{i}", json.dumps({"meter": f"m{i}", "energy_kwh": 2.0 + i}),
                            qos=1).wait_for_publish(10)
            wait_for(lambda: "watchdog withheld: store writer"
                     in notify_socket.last_status(), 60, what="STATUS says withheld")
            withheld_at = time.monotonic()
            # two full watchdog intervals (and more than the progress limit) without a ping
            time.sleep(8.0)
            assert notify_socket.pings(since=withheld_at) == []
            assert "watchdog withheld" in notify_socket.last_status()
            assert _readings_unlocked(lock) == 5  # nothing of the second lot committed
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        resumed_from = time.monotonic()
        wait_for(lambda: len(notify_socket.pings(since=resumed_from)) >= 2, 60,
                 what="pings resume once the store is free")
        wait_for(lambda: _readings(cfg) == 10, 60, what="the held readings are committed")
        log = (tmp_path / "daemon.log").read_text()
        assert "watchdog pings withheld" in log and "watchdog pings resume" in log
        assert daemon.stop() == 0
        assert any(f.get("STOPPING") == "1" for _, f in notify_socket.messages())
    finally:
        pub.disconnect()
        pub.loop_stop()
        daemon.kill()


def _readings_unlocked(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])


def test_daemon_without_notify_socket_sends_nothing_and_runs(
        broker: Mosquitto, tmp_path: Path, notify_socket: NotifySocket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET unset: not supervised, nothing sent (even with WATCHDOG_USEC)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    cfg = write_config(tmp_path / "d.toml", broker.port,
                       '[[sources]]\ntopic = "wd/#"\nformat = "json"\n')
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port)
    try:
        wait_up(cfg, 60)
        pub.publish("wd/a", json.dumps({"meter": "a", "energy_kwh": 1.0}),
                    qos=1).wait_for_publish(10)
        wait_for(lambda: _readings(cfg) == 1, 60, what="reading committed")
        assert daemon.stop() == 0
    finally:
        pub.disconnect()
        pub.loop_stop()
        daemon.kill()
    assert notify_socket.messages() == []
    assert "NOTIFY_SOCKET" not in (tmp_path / "daemon.log").read_text()


def test_broken_notify_socket_is_logged_not_silent(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "2000000"})
    assert n.enabled and n.watchdog_s == 2.0
    with caplog.at_level("ERROR", logger="monitor.app.sdnotify"):
        assert n.watchdog("ok") is False
        assert n.watchdog("ok") is False
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "nobody-listens" in errors[0].getMessage()
    assert n.errors == 2
    bad = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert bad.status("x") is False and bad.errors == 1


def test_abstract_socket_and_watchdog_pid(tmp_path: Path) -> None:
    name = f"energy-monitor-test-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify(ready="1", status="two\nlines") is True
        assert s.recv(4096) == b"READY=1\nSTATUS=two lines\n"
    finally:
        s.close()
    assert Notifier({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "bogus"}).watchdog_s is None
