"""Site set-up at scale: [[meter_patterns]], `meters import`, `meters discover`, meter.unknown.

The end-to-end tests run the real daemon against a real mosquitto and drive the real
CLI as a subprocess.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from monitor import config
from tests.daemon import ROOT, Daemon, publisher, query, status_json, wait_for, write_config
from tests.servers import Mosquitto

SITE = """
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"

[[meters]]
id = "special"
device = "tasmota/rig-001"
group = "hall-a"

[[meter_patterns]]
device = "tasmota/rig-*"
id = "{name}"
group = "hall-b"
rated_kw = 5
control = { kind = "tasmota", topic = "cmnd/{name}/POWER" }

[schedule]
check_interval_s = 1

[[rules]]
id = "hall-b-day"
kind = "energy_cap"
period = "calendar_day"
scope = "group:hall-b"
limit_kwh = 1000
"""


def cli(cfg: Path | None, *args: str, stdin: str | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ENERGY_MONITOR_CONFIG", None)
    extra = ["--config", str(cfg)] if cfg is not None else []
    return subprocess.run([sys.executable, "-m", "monitor", *args, *extra], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120, input=stdin, check=False)


def sensor(pub: paho.Client, topic: str, total_kwh: float, power_w: float) -> None:
    body = {"Time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "ENERGY": {"Total": round(total_kwh, 4), "Power": power_w}}
    pub.publish(f"tele/{topic}/SENSOR", json.dumps(body), qos=1).wait_for_publish(10)


def last_check(cfg: Path) -> float:
    rows = query(cfg, "SELECT value FROM kv WHERE key = 'check.last'")
    return float(rows[0][0]) if rows else 0.0


class Commands:
    """Every device command the daemon publishes (``cmnd/#``)."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.subscribe([("cmnd/#", 1), ("energy-monitor/+/status", 1)])
        self.online = threading.Event()
        self.c.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.startswith("energy-monitor/"):
            if msg.payload == b"online":
                self.online.set()
            return
        with self.lock:
            self.got.append((msg.topic, msg.payload.decode()))

    def wait_online(self) -> None:
        """The daemon subscribed (it publishes its retained online status after that)."""
        assert self.online.wait(30), "the daemon never came online"

    def snapshot(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


# --------------------------------------------------------------------------- patterns


def base(rest: str) -> dict[str, Any]:
    return tomllib.loads('[site]\nid = "s"\ncategory = "x"\n[[sources]]\n'
                         'topic = "tele/+/SENSOR"\nformat = "tasmota"\n' + rest)


def test_precedence_placeholders_and_collisions() -> None:
    cfg = config.parse(base("""
[[meters]]
id = "rig-005"
device = "tasmota/other-5"
[[meters]]
id = "special"
device = "tasmota/rig-001"
[[meter_patterns]]
device = "tasmota/rig-0[0-4]?"
id = "{name}"
group = "first"
[[meter_patterns]]
device = "tasmota/rig-*"
id = "{name}"
group = "second-{1}"
control = { kind = "tasmota", topic = "cmnd/{name}/POWER" }
[[meter_patterns]]
device = "shelly/*-plug-*:*"
id = "{1}-{2}"
group = "{1}"
control = { kind = "shelly_gen2", topic = "{prefix}-{name}" }
"""))
    r = config.MeterResolver(cfg)
    special = r.get("tasmota/rig-001")
    assert special is not None and special.id == "special" and special.group == ""
    first = r.get("tasmota/rig-017")
    assert first is not None and (first.id, first.group, first.control) == ("rig-017", "first",
                                                                             None)
    second = r.get("tasmota/rig-517")
    assert second is not None and second.group == "second-517"
    assert second.control is not None and second.control.topic == "cmnd/rig-517/POWER"
    # a pattern's id that is a [[meters]] entry's id is not a second meter
    assert r.get("tasmota/rig-005") is None and "tasmota/rig-005" not in r
    plug = r.get("shelly/hall-a-plug-07:2")
    assert plug is not None and (plug.id, plug.group) == ("hall-a-07", "hall-a")
    assert plug.control is not None
    assert (plug.control.topic, plug.control.channel) == ("shelly-hall-a-plug-07", 2)
    assert r.get("zigbee2mqtt/lamp") is None
    # two devices whose templates give one id: the second is unconfigured
    cfg2 = config.parse(base('[[meter_patterns]]\ndevice = "*/x-*"\nid = "{2}"\n'))
    r2 = config.MeterResolver(cfg2)
    a, b = r2.get("tasmota/x-1"), r2.get("shelly/x-1")
    assert a is not None and a.id == "1" and b is None


@pytest.mark.parametrize(("rest", "expected"), [
    ('[[meter_patterns]]\ndevice = "tasmota/*"\ngroup = "{nam}"\n',
     "meter_patterns[0].group: unknown placeholder {nam}"),
    ('[[meter_patterns]]\ndevice = "tasmota/*"\nid = "{2}"\n',
     "meter_patterns[0].id: unknown placeholder {2}"),
    ('[[meter_patterns]]\ndevice = "tasmota/*"\n'
     'control = { kind = "tasmota", topic = "cmnd/{x}/POWER" }\n',
     "meter_patterns[0]: control.topic: unknown placeholder {x}"),
    ('[[meter_patterns]]\ndevice = "tasmota/*"\ncolour = 1\n', "meter_patterns[0].colour: "
     "unknown key"),
    ('[[meter_patterns]]\ndevice = "tasmota/*"\ngroup = "a"\n[[rules]]\nid = "r"\n'
     'kind = "energy_cap"\nlimit_kwh = 1\nscope = "group:b"\n',
     "rules[0].scope: no meter is in group 'b'"),
])
def test_pattern_errors_name_the_key(rest: str, expected: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(base(rest))
    assert any(expected in p for p in exc.value.problems), exc.value.problems


def test_rules_may_name_groups_and_ids_a_pattern_gives() -> None:
    cfg = config.parse(base("""
[[meter_patterns]]
device = "tasmota/rig-*"
id = "rig-{1}"
group = "hall-{1}"
[[rules]]
id = "a"
kind = "energy_cap"
limit_kwh = 1
scope = "group:hall-7"
[[rules]]
id = "b"
kind = "energy_cap"
limit_kwh = 1
scope = "meter:rig-7"
"""))
    assert [r.id for r in cfg.rules] == ["a", "b"]


def test_patterns_in_the_daemon_groups_control_and_unknown_devices(
        tmp_path: Path, broker: Mosquitto) -> None:
    cfg = write_config(tmp_path / "c.toml", broker.port, SITE)
    assert cli(cfg, "check-config").returncode == 0
    log = tmp_path / "daemon.log"
    d = Daemon(cfg, log).start()
    cmds = Commands(broker.port)
    pub = publisher(broker.port)
    try:
        cmds.wait_online()
        for step in range(2):
            for name in ("rig-001", "rig-002", "rig-003", "other-1"):
                sensor(pub, name, 10 + step * 0.001, 1500)

        def meters() -> dict[str, str]:
            try:
                return {m["id"]: m["group"] for m in status_json(cfg)["meters"]}
            except subprocess.CalledProcessError:
                return {}

        wait_for(lambda: {"special", "rig-002", "rig-003", "tasmota/other-1"} <= set(meters()),
                 60, 0.5, "all four devices as meters")
        got = meters()
        assert got["special"] == "hall-a"
        assert got["rig-002"] == got["rig-003"] == "hall-b"
        assert got["tasmota/other-1"] == ""
        assert "rig-001" not in got  # the [[meters]] entry wins over the pattern

        def unknown() -> list[str]:
            return [r[0] for r in query(cfg, "SELECT scope FROM events WHERE kind = "
                                             "'meter.unknown' ORDER BY scope")]

        wait_for(lambda: unknown() != [], 30, 0.5, "meter.unknown")
        wait_for(lambda: last_check(cfg) > 0, 10, 0.5, "a check")
        before = last_check(cfg)
        wait_for(lambda: last_check(cfg) > before + 1.5, 30, 0.5, "two more checks")
        assert unknown() == ["meter:tasmota/other-1"]  # once, and only the unknown device
        text = log.read_text()
        assert "event kind=meter.unknown severity=warning" in text
        assert "scope=meter:tasmota/other-1" in text

        found = cli(cfg, "meters", "discover", "--json")
        assert found.returncode == 0, found.stderr
        assert [x["device"] for x in json.loads(found.stdout)["devices"]] == ["tasmota/other-1"]
        skel = cli(cfg, "meters", "discover", "--toml")
        assert tomllib.loads(skel.stdout)["meters"] == [{"id": "other-1",
                                                         "device": "tasmota/other-1"}]

        # a manual shutdown of the pattern's group reaches each pattern meter's own topic
        out = cli(cfg, "orders", "shutdown", "group:hall-b", "--reason", "test")
        assert out.returncode == 0, out.stderr
        assert "rig-002, rig-003" in out.stdout
        wait_for(lambda: {("cmnd/rig-002/POWER", "OFF"), ("cmnd/rig-003/POWER", "OFF")}
                 <= set(cmds.snapshot()), 30, 0.2, "the device commands")
        assert all(t.split("/")[1] in ("rig-002", "rig-003") for t, _ in cmds.snapshot())
    finally:
        pub.loop_stop()
        pub.disconnect()
        cmds.close()
        d.stop()


def test_discover_lists_refused_devices(tmp_path: Path, broker: Mosquitto) -> None:
    cfg = write_config(tmp_path / "c.toml", broker.port, SITE.replace(
        "[schedule]", "[intake]\nallow_unconfigured = false\n\n[schedule]"))
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    presence = Commands(broker.port)
    pub = publisher(broker.port)
    try:
        presence.wait_online()
        sensor(pub, "rig-044", 1.0, 100)  # a pattern's device: read
        for i in range(3):
            sensor(pub, "stray", 1.0 + i / 1000, 100)  # nobody's: refused
        wait_for(lambda: len(query(cfg, "SELECT 1 FROM dead_letters")) >= 3, 60, 0.5,
                 "the dead letters")
        wait_for(lambda: query(cfg, "SELECT 1 FROM meters WHERE id = 'rig-044'"), 30, 0.5,
                 "rig-044")
    finally:
        pub.loop_stop()
        pub.disconnect()
        presence.close()
        d.stop()
    out = cli(cfg, "meters", "discover")  # after the daemon stopped: from the store
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    stray = [ln for ln in lines if "tasmota/stray" in ln]
    assert len(stray) == 1 and "(refused)" in stray[0] and stray[0].rstrip().endswith(" 3")
    assert not any("rig-044" in ln for ln in lines)


# --------------------------------------------------------------------------- import


INVENTORY = """device,id,group,rated_kw,control_kind,control_topic
tasmota/rig-101,rig-101,hall-c,3.5,tasmota,cmnd/rig-101/POWER
tasmota/rig-102,,hall-c,3.5,tasmota,cmnd/rig-102/POWER

shelly/plus1pm-a8:0;shelly/hall-c/rig-103:0,rig-103,hall-c,,shelly_gen2,plus1pm-a8
"""


def test_import_writes_an_include_the_daemon_accepts(tmp_path: Path) -> None:
    site = write_config(tmp_path / "c.toml", 1883, SITE)
    inv = tmp_path / "inventory.csv"
    inv.write_text(INVENTORY)
    out = cli(site, "meters", "import", str(inv), "--out", str(tmp_path / "meters.toml"))
    assert out.returncode == 0, out.stderr
    assert "3 meters written" in out.stderr
    site.write_text('include = ["meters.toml"]\n' + site.read_text())
    cfg = config.load(site)
    new = {m.id: m for m in cfg.meters if m.group == "hall-c"}
    assert sorted(new) == ["rig-101", "rig-102", "rig-103"]  # rig-102: id from the device
    assert new["rig-102"].control is not None
    assert new["rig-102"].control.topic == "cmnd/rig-102/POWER"
    assert new["rig-103"].devices == ("shelly/plus1pm-a8:0", "shelly/hall-c/rig-103:0")
    assert new["rig-103"].rated_kw is None
    assert cli(site, "check-config").returncode == 0
    # printed instead of written when there is no --out; the same entries
    shown = cli(None, "meters", "import", str(inv), cwd=tmp_path / "..")
    assert shown.returncode == 0, shown.stderr
    assert len(tomllib.loads(shown.stdout)["meters"]) == 3


def test_import_reports_every_bad_row_by_line_and_writes_nothing(tmp_path: Path) -> None:
    site = write_config(tmp_path / "c.toml", 1883, SITE)
    inv = tmp_path / "inventory.csv"
    inv.write_text(
        "device,id,group,rated_kw,control_kind,control_topic\n"
        "tasmota/a,a,g,3.5,tasmota,cmnd/a/POWER\n"       # 2 ok
        "tasmota/b,b,g,-1,,\n"                           # 3 rated_kw
        "tasmota/c,c,g,2,relay,cmnd/c/POWER\n"           # 4 control_kind
        ",d,g,2,,\n"                                     # 5 device missing
        "tasmota/e,a,g,2,,\n"                            # 6 id of line 2
        "tasmota/a,f,g,2,,\n"                            # 7 device of line 2
        "tasmota/rig-001,g,g,2,,\n"                      # 8 device of the config
        "tasmota/h,special,g,2,,\n"                      # 9 id of the config
        "tasmota/i,i,g,2,tasmota,cmnd/+/POWER\n"         # 10 wildcard topic
        "tasmota/j,j,g,x,,\n")                           # 11 not a number
    out_file = tmp_path / "meters.toml"
    out = cli(site, "meters", "import", str(inv), "--out", str(out_file))
    assert out.returncode == 1
    assert not out_file.exists()
    lines = out.stderr.splitlines()
    by_line = {int(ln.split(":")[1]): ln for ln in lines if ln.startswith(str(inv))}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 10, 11], lines
    assert ": rated_kw: " in by_line[3]
    assert ": control_kind: " in by_line[4]
    assert ": device: " in by_line[5]
    assert "line 2" in by_line[6] and "line 2" in by_line[7]
    assert "'special'" in by_line[8] or "'special'" in by_line[9]
    assert ": control_topic: " in by_line[10]
    assert ": rated_kw: " in by_line[11]
    assert "9 problems" in lines[-1] and "nothing written" in lines[-1]


def test_import_never_overwrites_without_force(tmp_path: Path) -> None:
    site = write_config(tmp_path / "c.toml", 1883, SITE)
    inv = tmp_path / "inventory.csv"
    inv.write_text(INVENTORY)
    target = tmp_path / "meters.toml"
    target.write_text("# the operator's own file\n")
    out = cli(site, "meters", "import", str(inv), "--out", str(target))
    assert out.returncode == 1 and "not overwritten" in out.stderr
    assert target.read_text() == "# the operator's own file\n"
    out = cli(site, "meters", "import", str(inv), "--out", str(target), "--force")
    assert out.returncode == 0, out.stderr
    assert len(tomllib.loads(target.read_text())["meters"]) == 3


def test_import_refuses_an_unknown_column_and_a_missing_header(tmp_path: Path) -> None:
    site = write_config(tmp_path / "c.toml", 1883, SITE)
    inv = tmp_path / "inventory.csv"
    inv.write_text("device,colour\ntasmota/a,red\n")
    out = cli(site, "meters", "import", str(inv))
    assert out.returncode == 1 and "unknown column(s) colour" in out.stderr
    inv.write_text("tasmota/a,a,g\n")
    out = cli(site, "meters", "import", str(inv))
    assert out.returncode == 1 and "header" in out.stderr
