"""The shipped mosquitto configuration (deploy/mosquitto/), run as shipped.

mosquitto reads Debian's main file layout (``persistence``, ``include_dir``) and
our two files unchanged except for the lines marked ``SITE`` that name a path or
the listener: they are rewritten to the test's directory and a free loopback
port, and the test checks that nothing else differs.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.daemon import ROOT, Daemon, query, wait_for, write_config
from tests.servers import find_binary, free_port, mosquitto_user_line, stop_process, wait_port

CONF = ROOT / "deploy/mosquitto/energy-monitor.conf"
ACL = ROOT / "deploy/mosquitto/energy-monitor.acl"
SITE = "acl-site"
PASSWORDS = {"energy-monitor": "daemon-pw", "pow7": "pow7-pw", "pow8": "pow8-pw"}


def render(conf: str, workdir: Path, port: int) -> str:
    """The shipped file with its SITE lines pointed at ``workdir`` and ``port``
    (the persistence directory is set by Debian's main file, below)."""
    subst = {
        "password_file /etc/mosquitto/energy-monitor.passwd":
            f"password_file {workdir}/energy-monitor.passwd",
        "acl_file /etc/mosquitto/energy-monitor.acl": f"acl_file {workdir}/energy-monitor.acl",
        "listener 1883": f"listener {port} 127.0.0.1",
    }
    lines = conf.splitlines()
    for old in subst:
        assert lines.count(old) == 1, f"{old!r} must be one line of {CONF.name}"
    return "\n".join(subst.get(line, line) for line in lines) + "\n"


@dataclass
class ShippedBroker:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    passwords: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))

    def __post_init__(self) -> None:
        (self.workdir / "conf.d").mkdir(parents=True)
        (self.workdir / "data").mkdir()
        pw = self.workdir / "energy-monitor.passwd"
        binary = find_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
        for i, (user, password) in enumerate(self.passwords.items()):
            subprocess.run([binary, *(["-c"] if i == 0 else []), "-b", str(pw), user, password],
                           check=True, capture_output=True, timeout=30)
        pw.chmod(0o600)
        (self.workdir / "energy-monitor.acl").write_text(ACL.read_text())
        shipped = CONF.read_text()
        rendered = render(shipped, self.workdir, self.port)
        (self.workdir / "conf.d/energy-monitor.conf").write_text(rendered)
        changed = [(a, b) for a, b in zip(shipped.splitlines(), rendered.splitlines(),
                                          strict=True) if a != b]
        assert len(changed) == 3, changed
        # Debian's /etc/mosquitto/mosquitto.conf, with the log in the test's directory
        (self.workdir / "mosquitto.conf").write_text("\n".join([
            "persistence true",
            f"persistence_location {self.workdir}/data/",
            f"log_dest file {self.workdir}/mosquitto.log",
            mosquitto_user_line(),
            f"include_dir {self.workdir}/conf.d",
            ""]))

    def start(self) -> ShippedBroker:
        binary = find_binary("mosquitto", "/usr/sbin/mosquitto")
        self.proc = subprocess.Popen([binary, "-c", str(self.workdir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)  # SIGTERM: mosquitto writes its persistence file
        self.proc = None


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Any:
    b = ShippedBroker(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


class Client:
    """A paho MQTT 5 client logged in as ``user``; records what it receives and the
    PUBACK reason codes of its publishes."""

    def __init__(self, port: int, user: str, password: str | None = None,
                 client_id: str = "") -> None:
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.refused: int | None = None
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{user}",
                        protocol=paho.MQTTv5)
        c.username_pw_set(user, PASSWORDS.get(user) if password is None else password)
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_connect = self._on_connect
        c.max_inflight_messages_set(1000)
        self.c = c
        c.connect("127.0.0.1", port)
        c.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.refused = rc.value
        else:
            self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.got.append((msg.topic, msg.payload))

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.acks[mid] = rc.value

    def publish(self, topic: str, payload: str, qos: int = 1) -> int:
        info = self.c.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)
        return int(info.mid)

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.got]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


NOT_AUTHORIZED = 0x87


def test_persistence_on_and_queue_sized_for_a_day() -> None:
    conf = {line.split()[0]: line.split()[1:] for line in CONF.read_text().splitlines()
            if line and not line.startswith("#")}
    assert conf["persistence"] == ["true"]
    assert conf["allow_anonymous"] == ["false"]
    assert int(conf["max_queued_messages"][0]) >= 864_000  # 100 meters / 10 s, a day
    ops = (ROOT / "docs/operations.md").read_text()
    assert "max_queued_messages 1000000" in CONF.read_text() and "1,000,000" in ops
    assert "#listener 8883" in CONF.read_text() and "#certfile" in CONF.read_text()


def test_forged_orders_commands_and_telemetry_are_refused(shipped_broker: ShippedBroker) -> None:
    port = shipped_broker.port
    spy = Client(port, "energy-monitor", client_id="spy")  # the daemon's account reads all
    assert spy.connected.wait(10)
    spy.c.subscribe("#", qos=1)
    pow8 = Client(port, "pow8")
    assert pow8.connected.wait(10)
    pow8.c.subscribe("cmnd/pow8/#", qos=1)
    pow7 = Client(port, "pow7")
    assert pow7.connected.wait(10)
    time.sleep(0.5)
    forged = [f"energy-monitor/{SITE}/orders", f"energy-monitor/{SITE}/status",
              f"energy-monitor/{SITE}/curtailment", "cmnd/pow8/POWER", "cmnd/pow7/POWER",
              "tele/pow8/SENSOR", "shellies/pow7/relay/0/command", "pow8/rpc",
              "zigbee2mqtt/rack/set", "pow7/switch/relay/command", "meters/pow8/energy"]
    mids = {pow7.publish(t, json.dumps({"action": "shutdown", "scope": "site"})): t
            for t in forged}
    own = [pow7.publish("tele/pow7/SENSOR", '{"ENERGY":{"Total":1.5,"Power":100}}'),
           pow7.publish("tele/pow7/LWT", "Online")]
    # the daemon's account may command a device; the device reads its own command
    spy.publish("cmnd/pow8/POWER", "OFF")
    wait_for(lambda: "cmnd/pow8/POWER" in pow8.topics(), 10, what="daemon's command")
    wait_for(lambda: {"tele/pow7/SENSOR", "tele/pow7/LWT"} <= set(spy.topics()), 10,
             what="own telemetry delivered")
    time.sleep(1.0)  # anything forged would have arrived by now, before the own messages
    got = spy.topics()
    for t in forged:
        assert t not in got or (t == "cmnd/pow8/POWER" and got.count(t) == 1), t
    assert [t for t, p in pow8.got if p != b"OFF"] == []  # only the daemon's OFF reached it
    with pow7.lock:
        refused = {mids[m]: rc for m, rc in pow7.acks.items() if m in mids}
        assert refused == dict.fromkeys(forged, NOT_AUTHORIZED)
        assert all(pow7.acks[m] == 0 for m in own)
    # no account without a password, no anonymous login
    bad = Client(port, "pow7", password="wrong", client_id="bad")
    anon = paho.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=paho.MQTTv5)
    anon_rc: list[int] = []
    anon.on_connect = lambda c, u, f, rc, p: anon_rc.append(rc.value)
    anon.connect("127.0.0.1", port)
    anon.loop_start()
    wait_for(lambda: bad.refused is not None and anon_rc, 10, what="refused logins")
    assert anon_rc[0] != 0
    anon.loop_stop()
    for c in (spy, pow8, pow7, bad):
        c.close()


def _daemon_config(tmp_path: Path, port: int) -> Path:
    (tmp_path / "mqtt.pw").write_text(PASSWORDS["energy-monitor"] + "\n")
    cfg = write_config(tmp_path / "d.toml", port,
                       '[[sources]]\ntopic = "tele/+/SENSOR"\nformat = "tasmota"\n',
                       site=SITE, unrated_max_kw=1e12)
    text = cfg.read_text().replace(
        "reconnect_max_s = 2\n",
        f'reconnect_max_s = 2\nusername = "energy-monitor"\n'
        f'password_file = "{tmp_path / "mqtt.pw"}"\n', 1)
    cfg.write_text(text)
    return cfg


def _readings(cfg: Path, meter: str) -> int:
    rows = query(cfg, "SELECT count(*) FROM readings WHERE meter = ?", (meter,))
    return int(rows[0][0]) if rows else 0


def test_5000_qos1_backlog_survives_daemon_and_broker_restart(
        shipped_broker: ShippedBroker, tmp_path: Path) -> None:
    port = shipped_broker.port
    cfg = _daemon_config(tmp_path, port)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    meter = Client(port, "pow7")
    try:
        assert meter.connected.wait(10)

        def baseline_read() -> bool:  # sent again until the daemon has subscribed
            meter.publish("tele/pow7/SENSOR", '{"ENERGY":{"Total":0.0,"Power":0}}')
            return _readings(cfg, "tasmota/pow7") > 0

        wait_for(baseline_read, 60, interval_s=0.5, what="daemon reads pow7")
        time.sleep(1.0)
        n0 = _readings(cfg, "tasmota/pow7")
        assert daemon.stop() == 0  # its persistent session stays on the broker
        n = 5000
        for i in range(1, n + 1):
            info = meter.c.publish("tele/pow7/SENSOR",
                                   f'{{"ENERGY":{{"Total":{i / 1000:.3f},"Power":100}}}}', qos=1)
            if i % 500 == 0:
                info.wait_for_publish(30)
        info.wait_for_publish(30)
        with meter.lock:
            assert sum(1 for rc in meter.acks.values() if rc == 0) >= n
        # the broker too goes down and up meanwhile: the queue is in its persistence file
        shipped_broker.stop()
        shipped_broker.start()
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        wait_for(lambda: _readings(cfg, "tasmota/pow7") == n0 + n, 120,
                 what="all 5,000 queued readings committed")
        kwh = query(cfg, "SELECT sum(mwh) FROM ledger WHERE meter = 'tasmota/pow7'")[0][0]
        assert kwh == 5_000_000  # 5.000 kWh in mWh: every reading counted, once
        time.sleep(2.0)
        assert _readings(cfg, "tasmota/pow7") == n0 + n  # and nothing more arrives
        assert daemon.stop() == 0
    finally:
        meter.close()
        daemon.kill()
