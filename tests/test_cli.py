"""The command line as an operator meets it: real subprocesses of ``energy-monitor``,
the real daemon and broker where the command needs them."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from monitor.app import cli as cli_mod
from monitor.store.ledger import Store
from tests.daemon import ROOT, STARTED, Daemon, publisher, query, wait_for, write_config
from tests.servers import Mosquitto, free_port
from tests.test_meters_setup import Commands, last_check, sensor

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("ENERGY_MONITOR_CONFIG", None)


def run(*args: str, stdin: Any = None, input_text: str | None = None,
        timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=timeout_s, check=False,
                          stdin=stdin, input=input_text)


def minimal(tmp_path: Path, body: str = "") -> Path:
    return write_config(tmp_path / "c.toml", 1883, '[[sources]]\ntopic = "tele/+/SENSOR"\n'
                        'format = "tasmota"\n' + body)


# --------------------------------------------------------------------------- the bugs


def test_status_config_directory_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    for command in (["status"], ["check-config"], ["orders", "list"], ["audit", "verify"]):
        out = run(*command, "--config", str(tmp_path))
        assert out.returncode == 78, (command, out.stderr)
        assert "Traceback" not in out.stderr
        assert out.stderr.strip() == (f"config: {tmp_path} is a directory, not a TOML file "
                                      "(give the file, e.g. --config "
                                      "/etc/energy-monitor/config.toml)")


def test_status_into_a_pipe_closed_early_ends_quietly(tmp_path: Path) -> None:
    cfg = minimal(tmp_path)
    st = Store(tmp_path / "monitor.db")
    st.register_meters((f"rack-{i:05d}", f"tasmota/rack-{i:05d}", "hall-a") for i in range(6000))
    st.close()
    # a real shell pipe, as an operator types it; PIPESTATUS[0] is our exit status
    out = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m monitor status --config {cfg} | head -n 2;"
                       " echo rc=${PIPESTATUS[0]} >&2"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, check=False)
    assert out.stdout.startswith("site test-site"), out.stdout
    assert len(out.stdout.splitlines()) == 2
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert "rc=0" in out.stderr


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
              ) -> list[tuple[tuple[str, ...], str]]:
    """(command words, its one-line help) of every subcommand, nested ones included."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append(((*path, name), helps.get(name, "")))
                out += _commands(sub, (*path, name))
    return out


def test_every_subcommand_help_says_what_it_does() -> None:
    commands = _commands(cli_mod.build_parser())
    assert {("orders", "shutdown"), ("meters", "import"), ("meters", "discover"),
            ("notify", "test"), ("audit", "verify")} <= {c for c, _ in commands}
    top = run("--help")
    assert top.returncode == 0
    for words, text in commands:
        assert len(text) > 15, f"{' '.join(words)} has no description"
        out = run(*words, "--help")
        assert out.returncode == 0, (words, out.stderr)
        if words == ("simulate",):  # its own parser, which the simulator defines
            assert "simulated fleet" in out.stdout
            continue
        flat = " ".join(out.stdout.split())
        assert " ".join(text.split()) in flat, f"{' '.join(words)} --help lacks {text!r}"
        # the parent's list shows the same line
        parent = " ".join((run(*words[:-1], "--help") if len(words) > 1 else top).stdout.split())
        assert " ".join(text.split())[:40] in parent, words


@pytest.mark.parametrize("command", ["audit", "meters", "notify"])
def test_a_command_without_its_subcommand_prints_a_usage_line(tmp_path: Path,
                                                               command: str) -> None:
    out = run(command, "--config", str(minimal(tmp_path)))
    assert out.returncode == 2
    assert out.stderr.startswith(f"usage: energy-monitor {command} "), out.stderr
    assert "_cmd" not in out.stderr and "Traceback" not in out.stderr
    assert "choose a command:" in out.stderr


def test_check_config_says_which_rules_apply_and_why_the_others_do_not(tmp_path: Path) -> None:
    out = run("check-config", "--config", str(ROOT / "config.toml"))
    assert out.returncode == 0, out.stderr
    m = re.search(r"^(\d+) of (\d+) rules apply to this site today", out.stdout, re.M)
    assert m is not None, out.stdout
    applying, total = int(m.group(1)), int(m.group(2))
    assert total == len(tomllib_rules(ROOT / "config.toml"))
    listed = out.stdout.split("do not:\n", 1)[1].splitlines() if applying < total else []
    assert len(listed) == total - applying
    assert all("it is for region" in ln for ln in listed), listed

    today = dt.datetime.now(dt.UTC).date()
    cfg = minimal(tmp_path, f"""
[[rules]]
id = "mine"
kind = "energy_cap"
limit_kwh = 10
[[rules]]
id = "for-people"
kind = "energy_cap"
limit_kwh = 10
categories = ["individual"]
[[rules]]
id = "later"
kind = "energy_cap"
limit_kwh = 10
effective_from = {today + dt.timedelta(days=40)}
[[rules]]
id = "over"
kind = "energy_cap"
limit_kwh = 10
effective_until = {today - dt.timedelta(days=1)}
[[rules]]
id = "ban"
kind = "ban_window"
yearly = {{ start = "01-01", end = "12-31" }}
regions = ["RU-IRK"]
""")
    out = run("check-config", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"1 of 5 rules apply to this site today ({today}):" in text
    assert re.search(r"^  mine +energy_cap +site$", text, re.M)
    why = {ln.split()[0]: ln for ln in text.split("4 do not:\n")[1].splitlines()}
    assert "it is for individual; the site's category is 'legal_entity'" in why["for-people"]
    assert f"it takes effect on {today + dt.timedelta(days=40)}" in why["later"]
    assert f"it ended on {today - dt.timedelta(days=1)}" in why["over"]
    assert "it is for region RU-IRK; the site is in no region" in why["ban"]


def tomllib_rules(path: Path) -> list[Any]:
    from monitor import config  # noqa: PLC0415 - the loader merges the includes

    return list(config.load(path).rules)


def test_config_errors_name_the_file_and_line_across_includes(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.toml").write_text(
        "# a profile\n"                      # 1
        "[[rules]]\n"                        # 2
        'id = "cap"\n'                       # 3
        'kind = "energy_cap"\n'              # 4
        "limit_kwh = 6000\n"                 # 5
        "\n"                                 # 6
        "[[rules]]\n"                        # 7
        'id = "needs-limit"\n'               # 8
        'kind = "energy_cap"\n')             # 9
    site = tmp_path / "site.toml"
    site.write_text(
        'include = ["profiles/p.toml"]\n'    # 1
        "[site]\n"                           # 2
        'id = "s"\n'                         # 3
        'category = "x"\n'                   # 4
        'colour = "red"\n'                   # 5
        "[[sources]]\n"                      # 6
        'topic = "tele/+/SENSOR"\n'          # 7
        'format = "tasmota"\n'               # 8
        'notes = """\n'                      # 9
        "a [ multi-line string\n"            # 10
        '"""\n'                              # 11
        "[[rules]]\n"                        # 12
        'id = "mine"\n'                      # 13
        'kind = "power_cap"\n'               # 14
        "limit_kw = 0\n")                    # 15
    out = run("check-config", "--config", str(site))
    assert out.returncode == 78
    lines = out.stderr.splitlines()
    assert f"site.colour: unknown key ({site}, line 5)" in lines, lines
    assert f"sources[0].notes: unknown key ({site}, line 9)" in lines, lines
    p = tmp_path / "profiles" / "p.toml"
    assert f"rules[1].limit_kwh: required key is missing ({p}, line 7)" in lines, lines
    assert f"rules[2].limit_kw: Input should be greater than 0 ({site}, line 15)" in lines, lines


# --------------------------------------------------------------------------- with the daemon


class JsonDaemon(Daemon):
    """The daemon with ``run --log-format json``."""

    def start(self) -> JsonDaemon:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--log-format", "json", "--config",
             str(self.config)], stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        fh.close()
        STARTED.append(self)
        return self


class Hooks:
    """A webhook endpoint that keeps every body."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SITE = """
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"

[[meters]]
id = "m1"
device = "tasmota/m1"
group = "g"
control = {{ kind = "tasmota", topic = "cmnd/m1/POWER" }}

[schedule]
check_interval_s = 1

[[rules]]
id = "cap"
kind = "energy_cap"
period = "calendar_day"
scope = "group:g"
limit_kwh = 0.0005
on_breach = ["alert"]

[[rules]]
id = "for-people"
kind = "energy_cap"
categories = ["individual"]
limit_kwh = 10

[[webhooks]]
url = "{hook}"
events = ["*"]

[[webhooks]]
url = "http://127.0.0.1:{closed}/nobody"
events = ["notify.*"]
"""


def answered(cfg: Path, answer: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``orders resume`` on a terminal that answers ``answer`` (None: no terminal)."""
    if answer is None:
        return run("orders", "resume", *args, "--config", str(cfg), input_text="")
    master, slave = pty.openpty()
    try:
        os.write(master, answer.encode() + b"\n")
        return run("orders", "resume", *args, "--config", str(cfg), stdin=slave)
    finally:
        os.close(slave)
        os.close(master)


def test_operator_control_logs_and_status_against_the_daemon(tmp_path: Path,
                                                              broker: Mosquitto) -> None:
    hooks = Hooks()
    cfg = write_config(tmp_path / "c.toml", broker.port,
                       SITE.format(hook=hooks.url, closed=free_port()))
    log = tmp_path / "daemon.log"
    d = JsonDaemon(cfg, log).start()
    cmds = Commands(broker.port)
    pub = publisher(broker.port)
    cli_logs: list[str] = []  # an event is logged by the process that records it
    try:
        cmds.wait_online()
        sensor(pub, "m1", 10.0, 1200)
        time.sleep(1.1)
        sensor(pub, "m1", 10.002, 1200)
        wait_for(lambda: query(cfg, "SELECT state FROM alert_state WHERE rule = 'cap'")
                 == [("breach",)], 60, 0.3, "the breach")

        # status: running, with the time of the last check; only the applying rule
        st = run("status", "--config", str(cfg))
        assert st.returncode == 0, st.stderr
        assert re.search(r"^  daemon running, last check \S+Z \(\d+ s ago\)$", st.stdout, re.M)
        doc = json.loads(run("status", "--json", "--config", str(cfg)).stdout)
        assert doc["daemon"]["running"] is True and doc["daemon"]["last_check"]
        cc = run("check-config", "--config", str(cfg)).stdout
        assert "1 of 2 rules apply" in cc and "for-people" in cc.split("do not:")[1]
        assert [r["id"] for r in doc["rules"]] == ["cap"]

        # a manual shutdown, published by the daemon as the device's own command
        out = run("orders", "shutdown", "group:g", "--reason", "cooling", "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        cli_logs.append(out.stderr)
        assert "the running daemon publishes it" in out.stdout
        wait_for(lambda: ("cmnd/m1/POWER", "OFF") in cmds.snapshot(), 30, 0.2, "OFF")
        rows = query(cfg, "SELECT action, actor, reason FROM orders ORDER BY issued_at")
        assert rows[-1][0] == "shutdown" and rows[-1][2] == "cooling"

        # resume while the rule is in breach: asks; no terminal or "n" is no
        no_tty = answered(cfg, None, "group:g")
        assert no_tty.returncode == 1
        assert "still in breach: cap (group:g)" in no_tty.stderr
        assert "not resumed" in no_tty.stderr
        said_no = answered(cfg, "n", "group:g")
        assert said_no.returncode == 1 and "not resumed" in said_no.stderr
        assert [r[0] for r in query(cfg, "SELECT action FROM orders")].count("resume") == 0
        said_yes = answered(cfg, "y", "group:g")
        assert said_yes.returncode == 0, said_yes.stderr
        cli_logs.append(said_yes.stderr)
        assert "Resume group:g although the rule is still in breach? [y/N]" in said_yes.stdout
        forced = answered(cfg, None, "group:g", "--force")
        assert forced.returncode == 0, forced.stderr
        cli_logs.append(forced.stderr)
        assert [r[0] for r in query(cfg, "SELECT action FROM orders")].count("resume") == 2
        wait_for(lambda: ("cmnd/m1/POWER", "ON") in cmds.snapshot(), 30, 0.2, "ON")

        # notify test: each webhook, each answer
        nt = run("notify", "test", "--config", str(cfg))
        assert nt.returncode == 1, nt.stdout + nt.stderr
        lines = nt.stdout.splitlines()
        assert re.match(r"webhooks\[0\] .* \(json\): ok, HTTP 200 in \d+\.\d\d s$", lines[0])
        assert re.match(r"webhooks\[1\] .* \(json\): FAILED, no response: ", lines[1])
        tests = [e for e in hooks.got if e["kind"] == "notify.test"]
        assert len(tests) == 1 and tests[0]["site"] == "test-site"
        checked = last_check(cfg)
    finally:
        pub.loop_stop()
        pub.disconnect()
        cmds.close()
        rc = d.stop()
        hooks.close()
    assert rc == 0

    # after the daemon stopped: said plainly, with the time of the last check
    st = run("status", "--config", str(cfg))
    assert st.returncode == 0
    assert "DAEMON NOT RUNNING: the figures are as of the last check" in st.stdout
    assert "power at last reading" in st.stdout
    assert json.loads(run("status", "--json", "--config", str(cfg)).stdout)[
        "daemon"]["running"] is False
    assert last_check(cfg) >= checked

    # the log: JSON lines only, no APScheduler chatter, every event with its fields
    records = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert not [r for r in records if r["logger"].startswith("apscheduler")
                and r["level"] in ("info", "debug")]
    evs = [r for r in records if r["logger"] == "monitor.outputs.events"]
    firing = [r for r in evs if r.get("kind") == "alert.firing" and r.get("rule") == "cap"]
    assert firing and firing[0]["level"] in ("warning", "error")
    assert firing[0]["scope"] == "group:g" and firing[0]["msg"].startswith(
        "event kind=alert.firing ")
    by_cli = re.findall(r"event kind=(\S+) .*event_id=(\S+)", "".join(cli_logs))
    assert ("order.issued", ) in {(k,) for k, _ in by_cli}
    recorded = {r[0] for r in query(cfg, "SELECT event_id FROM events")}
    logged = [r["event_id"] for r in evs] + [i for _, i in by_cli]
    assert sorted(logged) == sorted(recorded)  # one line per event, each event


def test_verbose_shows_the_scheduler_jobs(tmp_path: Path, broker: Mosquitto) -> None:
    cfg = write_config(tmp_path / "c.toml", broker.port,
                       SITE.format(hook="http://127.0.0.1:9/x", closed=free_port()))
    log = tmp_path / "daemon.log"
    fh = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "-v", "run", "--config", str(cfg)],
                            stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    fh.close()
    try:
        wait_for(lambda: "Running job" in log.read_text(), 60, 0.3, "APScheduler at -v")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


# --------------------------------------------------------------------------- the demo


def test_ctrl_c_on_the_demo_stops_everything_and_prints_the_summary(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--every", "3",
                             "--data", str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)  # its own group, as a terminal's job
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.append(ln)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(ln.startswith("pids:") for ln in lines), 60, 0.2, "the demo")
        pids = [int(p) for p in re.findall(r"\d+", next(ln for ln in lines
                                                         if ln.startswith("pids:")))]
        assert len(pids) == 3
        wait_for(lambda: any("period energy" in ln for ln in lines), 60, 0.2, "a status")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        rc = proc.wait(180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    reader.join(10)
    out = "".join(lines)
    assert rc == 0, out
    assert "Traceback" not in out and "TimeoutExpired" not in out, out
    assert "--- summary" in out and "audit log ok" in out, out
    assert "daemon exited with 0;" in out, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_notify_test_reaches_each_webhook_in_its_format_and_language(tmp_path: Path) -> None:
    hooks = Hooks()
    try:
        cfg = minimal(tmp_path, f"""
[[webhooks]]
url = "{hooks.url}"
format = "telegram"
chat_id = "-100123"
language = "ru"
events = ["order.*"]

[[webhooks]]
url = "{hooks.url}"
format = "slack"
""")
        out = run("notify", "test", "--config", str(cfg))
        assert out.returncode == 0, out.stdout + out.stderr
        assert [ln.split(": ")[1] for ln in out.stdout.splitlines()] == [
            "ok, HTTP 200 in " + ln.split(" in ")[1] for ln in out.stdout.splitlines()]
        tg, slack = hooks.got  # the events filter does not hold back a test
        assert tg["chat_id"] == "-100123" and tg["parse_mode"] == "HTML"
        assert "ИНФО · проверка · test-site" in tg["text"]
        assert "Тестовое сообщение energy-monitor, площадка test-site: вебхук работает" in tg[
            "text"]
        assert slack["text"].startswith("ℹ️ INFO notify.test · test-site")  # noqa: RUF001
        assert "this webhook works" in slack["text"]
        (tmp_path / "none").mkdir()
        none = run("notify", "test", "--config", str(minimal(tmp_path / "none", "")))
        assert none.returncode == 1 and "no [[webhooks]] configured" in none.stderr
    finally:
        hooks.close()


def test_russian_texts_are_built_from_the_event_fields() -> None:
    from monitor.config import WebhookConfig  # noqa: PLC0415
    from monitor.outputs.webhooks.render import render  # noqa: PLC0415

    hook = WebhookConfig(url="https://x.invalid/", format="telegram", chat_id="1",
                         language="ru")

    def text(**body: Any) -> str:
        base = {"site": "irk-01", "at": "2026-11-27T02:00:00Z", "event_id": "e1",
                "message": "english"}
        return str(json.loads(render(hook, json.dumps({**base, **body})))["text"])

    warn = text(kind="alert.firing", severity="warning", rule="monthly-cap", scope="site",
                value=4812.5, limit=6000, unit="kWh", period="2026-11", projected=6411.3)
    assert ("Предупреждение по правилу «monthly-cap» для всей площадки: 4812,5 из 6000 кВт·ч "
            "(80,2 %), прогноз 6411,3 кВт·ч, период 2026-11") in warn
    assert "english" not in warn
    breach = text(kind="alert.firing", severity="critical", rule="b", scope="group:hall-b",
                  value=0.31, limit=0.3, unit="kWh")
    assert "Нарушено правило «b» для группы hall-b: 0,31 из 0,3 кВт·ч" in breach
    order = text(kind="order.issued", severity="warning", rule="", scope="group:hall-b",
                 action="shutdown", meters=["rig-1", "rig-2"])
    assert "Приказ на отключение группы hall-b (вручную, оператор); счётчики: rig-1, rig-2" in (
        order)
    stale = text(kind="meter.stale", severity="warning", rule="silent", scope="meter:rig-7",
                 value=1260.0, limit=900.0, unit="s")
    assert "Счётчик rig-7 молчит 21 мин (допустимо 15 мин)" in stale
    other = text(kind="something.new", severity="info", rule="", scope="site")
    assert "english" in other  # no template: the English message, Russian headline
