"""End to end: the daemon's HTTP endpoints against a real mosquitto and a real store.

``/healthz`` follows the broker going away and coming back (a subprocess daemon);
``/metrics``, ``/api/status`` and ``/`` show what was ingested; and a store that
cannot be written (an in-process :class:`~monitor.app.service.Service` whose database
another connection holds locked) keeps every reading unacknowledged at the broker
until it can commit them, exactly once; and webhook events that wait too long for
their endpoint make ``/healthz`` say so.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import paho.mqtt.client as paho
import pytest
from prometheus_client.parser import text_string_to_metric_families

import monitor.store.db
from monitor import config
from monitor.app.service import Service
from tests.daemon import Daemon, publisher, query, status_json, wait_for, write_config
from tests.servers import Mosquitto, free_port

SOURCES = """
[schedule]
check_interval_s = 1

[[sources]]
topic = "site/+/reading"
format = "json"

[[meters]]
id = "rack-07"
device = "rack-07"
group = "hall-a"

[[rules]]
id = "month-cap"
kind = "energy_cap"
period = "calendar_month"
limit_kwh = 1000
"""


# --------------------------------------------------------------------------- helpers


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; 4xx/5xx are answers too."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def health(port: int) -> tuple[int, list[str]]:
    code, ctype, body = get(port, "/healthz")
    assert ctype == "application/json"
    doc = json.loads(body)
    assert isinstance(doc, list) and (code == 200) is (not doc)
    return code, [str(r) for r in doc]


def http_config(tmp_path: Path, broker_port: int, body: str, *, site: str = "test-site"
                ) -> tuple[Path, int]:
    """A daemon config with ``[http]`` on a free loopback port."""
    port = free_port()
    cfg = write_config(tmp_path / "d.toml", broker_port, body, site=site, http=True,
                       unrated_max_kw=1e12)
    text = cfg.read_text()
    assert 'listen = "127.0.0.1:0"' in text
    cfg.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    return cfg, port


def send(pub: paho.Client, meter: str, seq: int, energy_kwh: float, power_w: float = 3250.0,
         ts: float | None = None) -> None:
    # Without an explicit ts, readings are stamped a second apart per seq (ending 20 s
    # ago at seq 20): a counter step at the very same device time is implausible.
    when = time.time() - 20 + seq if ts is None else ts
    body = {"meter": meter, "ts": round(when, 3),
            "energy_kwh": round(energy_kwh, 6), "power_w": power_w, "seq": seq}
    pub.publish(f"site/{meter}/reading", json.dumps(body), qos=1).wait_for_publish(10)


def committed(cfg: Path, meter: str) -> int:
    rows = query(cfg, "SELECT count(*) FROM readings WHERE meter = ?", (meter,))
    return int(rows[0][0]) if rows else 0


def stop_client(c: paho.Client) -> None:
    c.disconnect()
    c.loop_stop()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> sample name -> [(labels, value)] (the parser rejects bad text)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


# --------------------------------------------------------------------------- healthz


@pytest.mark.slow
def test_healthz_follows_the_broker_and_intake_resumes_after_it_returns(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cfg, port = http_config(tmp_path, broker.port, SOURCES)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: _answers(port) and health(port)[0] == 200, 30, what="healthy")
        pub = publisher(broker.port, "health-pub")
        send(pub, "rack-07", 0, 100.0)
        send(pub, "rack-07", 1, 100.1)
        wait_for(lambda: committed(cfg, "rack-07") == 2, 30, what="readings committed")
        stop_client(pub)

        broker.stop()
        wait_for(lambda: health(port)[0] == 503, 30, what="503 without a broker")
        code, reasons = health(port)
        assert code == 503
        assert any(r.startswith("mqtt:") for r in reasons), reasons
        assert not any(r.startswith("store") for r in reasons), reasons

        broker.start()  # same port, same persistence
        wait_for(lambda: health(port) == (200, []), 30, what="healthy again")

        # the daemon is subscribed again: what is published now is committed
        pub = publisher(broker.port, "health-pub-2")
        for seq in range(2, 7):
            send(pub, "rack-07", seq, 100.0 + seq / 10)
        stop_client(pub)
        wait_for(lambda: committed(cfg, "rack-07") == 7, 30, what="readings after the outage")
        kwh = query(cfg, "SELECT sum(mwh) / 1e6 FROM ledger WHERE meter = 'rack-07'")[0][0]
        assert kwh == pytest.approx(0.6)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def _answers(port: int) -> bool:
    try:
        get(port, "/healthz")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- metrics, status


@pytest.mark.slow
def test_metrics_api_status_and_page_show_what_was_ingested(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cfg, port = http_config(tmp_path, broker.port, SOURCES, site="http-01")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: _answers(port) and health(port)[0] == 200, 30, what="healthy")
        pub = publisher(broker.port, "metrics-pub")
        for seq in range(5):
            send(pub, "rack-07", seq, 100.0 + seq * 0.1)
        pub.publish("site/rack-07/reading", b"{not json", qos=1).wait_for_publish(10)
        stop_client(pub)
        wait_for(lambda: committed(cfg, "rack-07") == 5
                 and query(cfg, "SELECT count(*) FROM dead_letters")[0][0] == 1, 30,
                 what="readings and the dead letter committed")

        # /metrics: valid Prometheus text with the daemon's health figures; the
        # meter-age gauge is refreshed by a 15 s job, so wait for its first value
        def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
            code, ctype, body = get(port, "/metrics")
            assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
            return samples(body.decode())

        def meter_age() -> list[tuple[dict[str, str], float]]:
            return scrape().get("energy_monitor_meter_last_seen_age_seconds", [])

        wait_for(lambda: bool(meter_age()), 30, what="meter last-seen age")
        wait_for(lambda: scrape().get("energy_monitor_rule_state"), 30, what="rule state")
        m = scrape()
        readings = {(lb["format"], lb["outcome"]): v
                    for lb, v in m["energy_monitor_readings_total"]}
        assert readings[("json", "accounted")] == 5
        assert readings[("json", "dead_letter")] == 1
        assert m["energy_monitor_dead_letters_total"] == [({"reason": "not_json"}, 1.0)]
        assert m["energy_monitor_queue_depth"] == [({}, 0.0)]
        commits = m["energy_monitor_store_commit_seconds_count"]
        assert commits and commits[0][1] >= 1
        assert "energy_monitor_store_commit_seconds_bucket" in m
        assert ({"outbox": "webhooks"}, 0.0) in m["energy_monitor_outbox_backlog"]
        assert m["energy_monitor_rule_state"] == [({"rule": "month-cap", "scope": "site"}, 0.0)]
        ((labels, age),) = meter_age()
        assert labels == {"meter": "rack-07"} and 0 <= age < 60
        assert m["energy_monitor_store_writable"] == [({}, 1.0)]
        assert m["energy_monitor_mqtt_connected"] == [({}, 1.0)]

        # /api/status: the same document as `status --json`
        code, ctype, body = get(port, "/api/status")
        assert code == 200 and ctype == "application/json"
        api = json.loads(body)
        cli = status_json(cfg)
        for doc in (api, cli):
            doc.pop("now")
            doc.pop("now_local")
            doc.pop("daemon", None)  # only the CLI says whether a daemon runs
            doc["problems"].pop("health")  # only the daemon knows its health
            for r in doc["rules"]:  # the projection moves with the clock
                r["projected"] = pytest.approx(r["projected"], rel=1e-3)
        assert api == cli
        assert api["site"] == "http-01"
        assert [mt["id"] for mt in api["meters"]] == ["rack-07"]
        assert api["meters"][0]["period_kwh"] == pytest.approx(0.4)
        assert api["totals"] == {"period_kwh": pytest.approx(0.4), "power_w": 3250.0}
        assert [r["id"] for r in api["rules"]] == ["month-cap"]

        # /: the operator's page
        code, ctype, body = get(port, "/")
        page = body.decode()
        assert code == 200 and ctype.startswith("text/html")
        assert "http-01" in page and "rack-07" in page and "month-cap" in page
        assert "healthy" in page

        assert get(port, "/nope")[0] == 404
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# --------------------------------------------------------------------------- store fault


@pytest.mark.slow
def test_locked_store_holds_readings_unacknowledged_and_commits_them_once(
    broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds the database's write lock for a few seconds.

    The daemon's commits wait SQLite's busy timeout (30 s in production) and then
    fail; here the in-process service's connections get 250 ms instead, by wrapping
    ``monitor.store.db.connect`` (the one place every read-write connection is opened), so
    the failure is seen within the test without holding the lock for 30 s.
    """
    real_connect = monitor.store.db.connect

    def quick_connect(path: Path | str) -> sqlite3.Connection:
        conn = real_connect(path)
        conn.execute("PRAGMA busy_timeout=250")
        return conn

    monkeypatch.setattr(monitor.store.db, "connect", quick_connect)
    receive_maximum = 10
    cfg_path, port = http_config(
        tmp_path, broker.port,
        SOURCES + "\n[intake]\nbatch_wait_ms = 20\n", site="lock-01")
    text = cfg_path.read_text().replace(
        "[mqtt]\n", f"[mqtt]\nreceive_maximum = {receive_maximum}\n")
    cfg_path.write_text(text)
    cfg = config.load(cfg_path)
    svc = Service(cfg)
    svc.start()
    pub = publisher(broker.port, "lock-pub")
    locker: sqlite3.Connection | None = None
    try:
        assert svc.mqtt is not None
        assert svc.mqtt.connected.wait(30)
        t0 = time.time() - 100.0
        send(pub, "rack-07", 0, 100.0, ts=t0)
        wait_for(lambda: committed(cfg_path, "rack-07") == 1, 30, what="baseline committed")
        wait_for(lambda: health(port) == (200, []), 30, what="healthy")
        received0 = svc.metrics.messages_received._value.get()

        locker = sqlite3.connect(cfg.storage.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        n = 30
        for seq in range(1, n + 1):
            send(pub, "rack-07", seq, 100.0 + seq * 0.01, ts=t0 + seq)
        wait_for(lambda: health(port)[0] == 503, 20, what="503 while the store is locked")
        _, reasons = health(port)
        assert any(r.startswith("store:") for r in reasons), reasons
        time.sleep(1.5)  # commits keep failing and are retried with backoff
        assert committed(cfg_path, "rack-07") == 1, "nothing committed through the lock"
        assert svc.metrics.store_errors._value.get() >= 1
        # held unacknowledged: the broker sends no more than Receive Maximum of them
        in_flight = svc.metrics.messages_received._value.get() - received0
        assert 1 <= in_flight <= receive_maximum, in_flight

        locker.execute("ROLLBACK")
        locker.close()
        locker = None
        wait_for(lambda: committed(cfg_path, "rack-07") == n + 1, 60,
                 what="everything committed after the lock")
        wait_for(lambda: health(port) == (200, []), 30, what="healthy after the lock")
        rows = query(cfg_path, "SELECT count(*), count(DISTINCT ts) FROM readings")
        assert rows == [(n + 1, n + 1)], "each reading exactly once"
        kwh = query(cfg_path, "SELECT sum(mwh) / 1e6 FROM ledger")[0][0]
        assert kwh == pytest.approx(n * 0.01)
        assert svc.metrics.messages_received._value.get() - received0 == n
    finally:
        if locker is not None:
            locker.close()
        stop_client(pub)
        svc.stop()


# --------------------------------------------------------------------------- webhook backlog


class _Hook(BaseHTTPRequestHandler):
    got: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Hook.got.append(self.headers.get("X-Energy-Monitor-Event-Id", ""))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_healthz_reports_webhook_events_waiting_too_long(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A configured meter that never reports is announced once it has been silent for
    max_silence_s since the daemon started (the service's clock is moved on); its event
    cannot be delivered (nothing listens on the webhook's port).  Once the oldest
    undelivered event is older than 15 min (the service's clock is moved on, the
    wall clock is not) /healthz says so; when the endpoint answers it is healthy again."""
    hook_port = free_port()
    body = SOURCES + f"""
[[rules]]
id = "silence"
kind = "stale_data"
max_silence_s = 600

[[webhooks]]
url = "http://127.0.0.1:{hook_port}/hook"
"""
    cfg_path, port = http_config(tmp_path, broker.port, body, site="hook-01")
    skew = [0.0]
    svc = Service(config.load(cfg_path), clock=lambda: time.time() + skew[0])
    svc.start()
    skew[0] = 700.0  # silent for longer than max_silence_s since the start
    server: ThreadingHTTPServer | None = None
    try:
        failed = ("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'"
                  " AND attempts >= 1")
        wait_for(lambda: query(cfg_path, failed) == [(1,)], 30, what="a failed delivery")
        ((event_id,),) = query(cfg_path, "SELECT event_id FROM events WHERE kind = 'meter.stale'")
        wait_for(lambda: health(port) == (200, []), 30, what="healthy with a young backlog")

        skew[0] = 1700.0
        wait_for(lambda: health(port)[0] == 503, 30, what="503 for an old backlog")
        _, reasons = health(port)
        assert any(r.startswith("webhooks:") for r in reasons), reasons

        _Hook.got.clear()
        server = ThreadingHTTPServer(("127.0.0.1", hook_port), _Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        skew[0] = 1800.0  # past the retry back-off of the failed attempts
        wait_for(lambda: health(port) == (200, []), 30, what="healthy once delivered")
        assert _Hook.got == [event_id]
    finally:
        svc.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
