"""Every secret is configured, and used, and none appears where it could leak.

The daemon runs against a broker that requires its password, signs a JSON webhook
with its secret, posts to a Telegram "bot API" whose token is in the URL (from
``${TELEGRAM_TOKEN}``), to a Slack-style URL whose path is the secret, and exports
to an InfluxDB-compatible endpoint with its token.  The receivers record what they
got, which proves each secret was really in use; then the daemon's log, /metrics,
/, /api/status, /healthz, ``status --json`` and the reports (JSON and HTML) are
searched for each secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.daemon import ROOT, Daemon, query, status_json, wait_for, write_config
from tests.test_broker_config import PASSWORDS, Client, ShippedBroker


class Recorder:
    """An HTTP server that answers every POST (204 for InfluxDB writes, else 200 with
    a Telegram-like body) and records path, headers and body."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with rec.lock:
                    rec.got.append((self.path, dict(self.headers.items()), body))
                if "/api/v2/write" in self.path:
                    self.send_response(204)
                    self.end_headers()
                    return
                out = b'{"ok":true,"result":{}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests(self, prefix: str) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return [r for r in self.got if r[0].startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    try:
        yield r
    finally:
        r.close()


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:  # /healthz may answer 503: its body counts too
        return str(exc.read().decode())


def _cli(cfg: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "monitor", *args, "--config", str(cfg)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


@pytest.mark.slow
def test_no_secret_in_logs_metrics_status_page_or_report(
        tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    found = {
        "mqtt password": "mqttpw-" + secrets.token_hex(8),
        "webhook secret": "hooksecret-" + secrets.token_hex(8),
        "telegram token": f"{secrets.randbelow(10**9)}:AA" + secrets.token_hex(12),
        "slack url secret": "slk" + secrets.token_hex(10),
        "influxdb token": "influxtok-" + secrets.token_hex(8),
    }
    broker = ShippedBroker(tmp_path / "broker",
                           passwords={**PASSWORDS, "energy-monitor": found["mqtt password"]})
    broker.start()
    daemon: Daemon | None = None
    try:
        sec = tmp_path / "secrets"
        sec.mkdir()
        (sec / "mqtt").write_text(found["mqtt password"] + "\n")
        (sec / "webhook").write_text(found["webhook secret"] + "\n")
        (sec / "influx").write_text(found["influxdb token"] + "\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(sec))
        monkeypatch.setenv("TELEGRAM_TOKEN", found["telegram token"])
        base = f"http://127.0.0.1:{recorder.port}"
        body = f"""
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"

[[meters]]
id = "rack-07"
device = "tasmota/pow7"

[[rules]]
id = "tiny-cap"
kind = "energy_cap"
period = "calendar_day"
scope = "meter:rack-07"
limit_kwh = 0.001
on_breach = ["alert"]

[influxdb]
url = "{base}"
org = "o"
bucket = "b"
token_file = "${{CREDENTIALS_DIRECTORY}}/influx"
flush_interval_s = 1

[[webhooks]]
url = "{base}/json-hook"
secret_file = "${{CREDENTIALS_DIRECTORY}}/webhook"

[[webhooks]]
url = "{base}/bot${{TELEGRAM_TOKEN}}/sendMessage"
format = "telegram"
chat_id = "-100123"

[[webhooks]]
url = "{base}/services/T0/B0/{found["slack url secret"]}"
format = "slack"

[schedule]
check_interval_s = 1
"""
        cfg = write_config(tmp_path / "d.toml", broker.port, body, site="sec-site", http=True,
                           unrated_max_kw=1e12)
        cfg.write_text(cfg.read_text().replace(
            "reconnect_max_s = 2\n",
            'reconnect_max_s = 2\nusername = "energy-monitor"\n'
            'password_file = "${CREDENTIALS_DIRECTORY}/mqtt"\n', 1))
        log = tmp_path / "daemon.log"
        daemon = Daemon(cfg, log).start()
        meter = Client(broker.port, "pow7")
        assert meter.connected.wait(10)
        total = [0.0]

        def publish_and_count() -> bool:  # sent until the daemon has subscribed
            total[0] += 0.5
            meter.publish("tele/pow7/SENSOR",
                          json.dumps({"ENERGY": {"Total": total[0], "Power": 500}}))
            return bool(query(cfg, "SELECT 1 FROM ledger WHERE mwh > 0"))

        wait_for(publish_and_count, 60, interval_s=1.0, what="energy booked (MQTT password ok)")
        # each secret was used: the receivers saw the signed hook, the bot URL, the
        # slack URL and the token-authenticated InfluxDB write
        wait_for(lambda: recorder.requests("/json-hook") and recorder.requests("/bot")
                 and recorder.requests("/services/") and recorder.requests("/api/v2/write"),
                 90, what="every webhook and an InfluxDB write")
        _path, headers, raw = recorder.requests("/json-hook")[0]
        mac = hmac.new(found["webhook secret"].encode(), raw, hashlib.sha256).hexdigest()
        assert headers["X-Energy-Monitor-Signature"] == "sha256=" + mac
        assert recorder.requests("/bot")[0][0] == f"/bot{found['telegram token']}/sendMessage"
        influx_auth = recorder.requests("/api/v2/write")[0][1].get("Authorization")
        assert influx_auth == f"Token {found['influxdb token']}"

        port_m = re.search(r"HTTP on 127\.0\.0\.1:(\d+)", log.read_text())
        assert port_m, log.read_text()
        http = f"http://127.0.0.1:{port_m.group(1)}"
        surfaces = {
            "/metrics": _get(http + "/metrics"),
            "/": _get(http + "/"),
            "/api/status": _get(http + "/api/status"),
            "/healthz": _get(http + "/healthz"),
            "status --json": json.dumps(status_json(cfg)),
            "status": _cli(cfg, "status"),
        }
        assert "rack-07" in surfaces["/"] and "energy_monitor_" in surfaces["/metrics"]
        month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
        for fmt in ("json", "html"):
            out = tmp_path / f"report.{fmt}"
            _cli(cfg, "report", "--period", month, "--format", fmt, "--out", str(out))
            surfaces[f"report {fmt}"] = out.read_text()
        assert "rack-07" in surfaces["report html"]
        daemon.stop()
        daemon = None
        meter.close()
        surfaces["daemon log"] = log.read_text()
        assert "started" in surfaces["daemon log"]
        leaks = [(what, where) for what, value in found.items()
                 for where, text in surfaces.items()
                 if value in text or quote(value, safe="") in text]
        assert leaks == [], leaks
    finally:
        if daemon is not None:
            daemon.kill()
        broker.stop()
