"""Webhook outbox and sender against a real HTTP receiver on 127.0.0.1.

The receiver checks every request's HMAC signature and counts events by id, so
"every event arrives" and "duplicates share the event id" are asserted on what
went over TCP.  Time is driven by the ``now`` passed to ``deliver_due``.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from monitor.config import WebhookConfig
from monitor.outputs import webhooks as wh
from monitor.store.schema import MIGRATIONS
from tests.servers import free_port

T0 = 1_795_000_000.0
SECRET = "s3cret-Пароль"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


# --------------------------------------------------------------------------- receiver


@dataclass
class Got:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook endpoint.  ``script`` responses are used first, then 200."""

    port: int
    secret: str | None = SECRET
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    gate: threading.Event | None = None  # answer only once this is set (or after 5 s)
    notify: tuple[int, threading.Event] | None = None  # set the event after this many requests
    gate_was_open: list[bool] = field(default_factory=list)
    got: list[Got] = field(default_factory=list)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def by_event(self) -> Counter[str]:
        with self.lock:
            return Counter(g.headers["x-energy-monitor-event-id"] for g in self.got)

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    if outer.secret is not None:
                        want = "sha256=" + hmac.new(outer.secret.encode(), body,
                                                    hashlib.sha256).hexdigest()
                        if not hmac.compare_digest(want, headers.get(
                                "x-energy-monitor-signature", "")):
                            outer.bad_signatures += 1
                    outer.got.append(Got(self.path, headers, body))
                    status, extra = outer.script.pop(0) if outer.script else (200, {})
                    if outer.notify is not None and len(outer.got) >= outer.notify[0]:
                        outer.notify[1].set()
                if outer.gate is not None:
                    outer.gate_was_open.append(outer.gate.wait(5.0))
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())  # not started: connections are refused until a test starts it
    yield r
    r.stop()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "monitor.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        from monitor.store.db import migrate  # noqa: PLC0415 -- use the store's migrations if present
    except ImportError:
        for _, sql in sorted(MIGRATIONS):
            conn.executescript(sql)
    else:
        migrate(conn)
    conn.close()
    return path


def hook(url: str, **kw: Any) -> WebhookConfig:
    kw.setdefault("secret", SECRET)
    return WebhookConfig.model_validate({"url": url, **kw})


def event(i: int = 0, kind: str = "alert.firing", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": kind, "severity": "warning", "site": "irk-01", "rule": "monthly-cap",
        "scope": "site", "message": f"80% of the monthly limit used: {4812.0 + i} of 6000 kWh",
        "value": 4812.0 + i, "limit": 6000, "unit": "kWh", "period": "2026-11",
        "projected": 6411.3, "at": T0 + i,
    }
    return {**base, **kw}


def put(path: Path, events: list[dict[str, Any]], hooks: list[WebhookConfig],
        now: float = T0) -> list[str]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    ids = [wh.enqueue(conn, e, hooks, now) for e in events]
    conn.execute("COMMIT")
    conn.close()
    return ids


def rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    out = conn.execute(
        "SELECT event_id, webhook, state, attempts, next_at, last_error FROM webhook_deliveries"
    ).fetchall()
    conn.close()
    return out


def sender(path: Path, hooks: list[WebhookConfig], **kw: Any) -> wh.WebhookSender:
    kw.setdefault("_random", lambda: 1.0)  # the longest delay: the clock must pass it
    return wh.WebhookSender(hooks, path, **kw)


# --------------------------------------------------------------------------- delivery


def test_every_event_arrives_through_refusal_500_429_and_a_restart(
    db: Path, receiver: Receiver
) -> None:
    hooks = [hook(receiver.url)]
    ids = put(db, [event(i) for i in range(5)], hooks)
    outcomes: list[str] = []
    s1 = sender(db, hooks, on_outcome=outcomes.append)
    now = T0

    stats = s1.deliver_due(now)  # nothing listens: one attempt, the whole queue waits
    assert (stats.delivered, stats.failed) == (0, 1)
    assert all(r[2] == "pending" and r[4] > now for r in rows(db))
    assert s1.deliver_due(now).failed == 0  # not due yet: the endpoint is not hammered
    assert wh.backlog(sqlite3.connect(db), now).pending == 5

    receiver.script = [(500, {}), (429, {"Retry-After": "1"})]
    receiver.start()
    now += 5.0  # attempt 1 backed off at most 5 s
    stats = s1.deliver_due(now)
    assert (stats.delivered, stats.failed) == (0, 1)
    now += 10.0  # attempt 2: at most 10 s
    stats = s1.deliver_due(now)
    assert (stats.delivered, stats.failed) == (0, 1)
    retry_at = max(r[4] for r in rows(db))
    assert retry_at == now + 1.0  # Retry-After honoured exactly
    assert s1.deliver_due(now + 0.5).delivered == 0

    s2 = sender(db, hooks)  # a restart: nothing in memory, all state in SQLite
    stats = s2.deliver_due(now + 1.0)
    assert stats.delivered == 5 and stats.failed == 0
    assert all(r[2] == "delivered" for r in rows(db))

    got = receiver.by_event()
    assert set(got) == set(ids)  # every event arrived
    assert got[ids[0]] == 3  # the three failed attempts were of the oldest event...
    assert all(got[i] == 1 for i in ids[1:])  # ...and nothing newer overtook it
    assert receiver.bad_signatures == 0
    for g in receiver.got:  # duplicates are the same event: same id, same bytes
        assert g.json["event_id"] == g.headers["x-energy-monitor-event-id"]
    first = [g.body for g in receiver.got if g.json["event_id"] == ids[0]]
    assert len(set(first)) == 1
    assert [g.json["event_id"] for g in receiver.got[2:]] == ids  # oldest first
    assert outcomes == ["failed", "failed", "failed"]
    assert wh.backlog(sqlite3.connect(db), now).pending == 0


def test_events_queued_while_the_endpoint_is_backed_off_wait_too(
    db: Path, receiver: Receiver
) -> None:
    # the daemon keeps queueing events while an endpoint fails: they must not be
    # sent before the backoff (or Retry-After) is over, nor before the older event
    hooks = [hook(receiver.url)]
    first = put(db, [event(0)], hooks)
    s = sender(db, hooks)
    assert s.deliver_due(T0).failed == 1  # refused: held for up to 5 s
    receiver.script = [(429, {"Retry-After": "30"})]
    receiver.start()
    later = put(db, [event(1)], hooks, now=T0 + 1)
    stats = s.deliver_due(T0 + 1)  # the new event is due by itself, but the webhook waits
    assert (stats.delivered, stats.failed) == (0, 0) and receiver.got == []
    assert s.deliver_due(T0 + 5).failed == 1  # the oldest first: 429, Retry-After 30 s
    put(db, [event(2)], hooks, now=T0 + 6)
    assert s.deliver_due(T0 + 20).delivered == 0
    assert s.deliver_due(T0 + 35).delivered == 3
    got = [g.json["event_id"] for g in receiver.got]
    assert got[0] == first[0] and got[1:3] == [first[0], later[0]]  # oldest first


def test_json_body_is_the_stored_event_body_byte_for_byte(db: Path, receiver: Receiver) -> None:
    receiver.start()
    hooks = [hook(receiver.url)]
    (eid,) = put(db, [event(0, message="Ангарск: 80% <лимита> & more", projected=float("nan"))],
                 hooks)
    assert sender(db, hooks).deliver_due(T0).delivered == 1
    conn = sqlite3.connect(db)
    (stored,) = conn.execute("SELECT body FROM events WHERE event_id = ?", (eid,)).fetchone()
    conn.close()
    (g,) = receiver.got
    assert g.body == stored.encode()
    assert g.headers["content-type"] == "application/json"
    body = g.json
    assert body["event_id"] == eid
    assert body["at"] == "2026-11-18T11:06:40Z"
    assert body["projected"] is None  # NaN cannot travel as JSON
    assert set(body) >= {"event_id", "kind", "severity", "site", "rule", "scope", "message",
                         "value", "limit", "unit", "period", "projected", "at"}


def test_no_secret_no_signature_header(db: Path, receiver: Receiver) -> None:
    receiver.secret = None
    receiver.start()
    hooks = [hook(receiver.url, secret=None)]
    put(db, [event()], hooks)
    assert sender(db, hooks).deliver_due(T0).delivered == 1
    (g,) = receiver.got
    assert "x-energy-monitor-signature" not in g.headers
    assert g.headers["x-energy-monitor-event-id"]


def test_max_age_makes_deliveries_undeliverable_and_logs_no_secret(
    db: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{receiver.port}/bot123456:SECRET-TOKEN/sendMessage"
    hooks = [hook(url, max_age_s=60)]
    ids = put(db, [event(0), event(1)], hooks)
    outcomes: list[str] = []
    s = sender(db, hooks, on_outcome=outcomes.append)
    assert s.deliver_due(T0).failed == 1
    stats = s.deliver_due(T0 + 30)
    assert stats.undeliverable == 0
    stats = s.deliver_due(T0 + 61)
    assert stats.undeliverable == 2
    assert sorted(e for e, _ in stats.undeliverable_events) == sorted(ids)
    assert {r[2] for r in rows(db)} == {"undeliverable"}
    assert "older than max_age_s" in rows(db)[0][5]
    assert outcomes.count("undeliverable") == 2
    assert wh.backlog(sqlite3.connect(db), T0 + 61).pending == 0
    assert "undeliverable" in caplog.text
    assert SECRET not in caplog.text and "SECRET-TOKEN" not in caplog.text
    receiver.start()
    assert s.deliver_due(T0 + 3600).delivered == 0  # given up rows are not sent later
    assert receiver.got == []


def test_removed_webhook_rows_become_undeliverable(db: Path, receiver: Receiver) -> None:
    receiver.start()
    old, new = hook(receiver.url + "/old"), hook(receiver.url)
    put(db, [event()], [old, new])
    stats = sender(db, [new]).deliver_due(T0)
    assert (stats.delivered, stats.undeliverable) == (1, 1)
    assert sorted(r[2] for r in rows(db)) == ["delivered", "undeliverable"]


def test_down_or_slow_webhook_does_not_block_the_others(db: Path) -> None:
    # The slow receiver answers only once the good one has every event (or after 5 s):
    # if webhooks were served one after another, the gate would still be shut.
    gate = threading.Event()
    good = Receiver(free_port(), notify=(20, gate)).start()
    slow = Receiver(free_port(), gate=gate).start()
    try:
        hooks = [
            hook(slow.url, timeout_s=10),
            hook(f"http://127.0.0.1:{free_port()}/closed", timeout_s=0.5),
            hook(good.url),
        ]
        put(db, [event(i) for i in range(20)], hooks)
        stats = sender(db, hooks).deliver_due(T0)
        assert slow.gate_was_open == [True] * 20
        assert stats.delivered == 40 and stats.failed == 1
        assert len(good.got) == 20
    finally:
        good.stop()
        slow.stop()


def test_rejected_request_is_retried_slowly_without_holding_back_newer_events(
    db: Path, receiver: Receiver
) -> None:
    receiver.script = [(404, {})]
    receiver.start()
    hooks = [hook(receiver.url)]
    ids = put(db, [event(0), event(1)], hooks)
    outcomes: list[str] = []
    s = sender(db, hooks, on_outcome=outcomes.append)
    stats = s.deliver_due(T0)
    assert (stats.rejected, stats.delivered) == (1, 0)  # one request, then the round stops
    state = {r[0]: r for r in rows(db)}
    assert state[ids[0]][4] >= T0 + 30  # the slow schedule: rejected_base_s=60, equal jitter
    assert state[ids[0]][5].startswith("HTTP 404")
    assert s.deliver_due(T0 + 1).delivered == 1  # the newer event is not held back
    assert s.deliver_due(T0 + 59).delivered == 0
    assert s.deliver_due(T0 + 60).delivered == 1  # and the rejected one is retried
    assert set(receiver.by_event()) == set(ids)
    assert outcomes == ["rejected", "delivered", "delivered"]


def test_redirects_are_not_followed(db: Path, receiver: Receiver) -> None:
    receiver.script = [(302, {"Location": "/elsewhere"})]
    receiver.start()
    hooks = [hook(receiver.url)]
    put(db, [event()], hooks)
    stats = sender(db, hooks).deliver_due(T0)
    assert stats.rejected == 1 and stats.delivered == 0
    assert [g.path for g in receiver.got] == ["/hook"]


def test_backoff_grows_and_is_capped(db: Path, receiver: Receiver) -> None:
    hooks = [hook(receiver.url)]
    put(db, [event()], hooks)
    s = sender(db, hooks, _random=lambda: 0.0)  # the shortest delay: half the backoff
    now, delays = T0, []
    for _ in range(10):
        s.deliver_due(now)
        next_at = rows(db)[0][4]
        delays.append(next_at - now)
        now = next_at
    assert delays == [2.5, 5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert rows(db)[0][3] == 10
    assert "refused" in rows(db)[0][5].lower() or "errno" in rows(db)[0][5].lower()


# --------------------------------------------------------------------------- formats


def test_slack_and_telegram_bodies(db: Path, receiver: Receiver) -> None:
    receiver.start()
    hooks = [
        hook(receiver.url + "/slack", format="slack"),
        hook(receiver.url + "/tg", format="telegram", chat_id="-100123"),
        hook(receiver.url + "/tg", format="telegram", chat_id="@ops"),
    ]
    put(db, [event(0, message="usage <b>80%</b> & rising")], hooks)
    assert sender(db, hooks).deliver_due(T0).delivered == 3
    assert receiver.bad_signatures == 0
    by_path: dict[str, list[Any]] = {}
    for g in receiver.got:
        by_path.setdefault(g.path, []).append(g.json)
    (slack,) = by_path["/hook/slack"]
    assert set(slack) == {"text"}
    assert "usage &lt;b&gt;80%&lt;/b&gt; &amp; rising" in slack["text"]
    assert "WARNING alert.firing" in slack["text"]
    assert "value 4812 / limit 6000 kWh" in slack["text"]
    tg = sorted(by_path["/hook/tg"], key=lambda b: b["chat_id"])
    assert [b["chat_id"] for b in tg] == ["-100123", "@ops"]
    for body in tg:
        assert body["parse_mode"] == "HTML"
        assert body["text"].startswith("<b>")
        assert "usage &lt;b&gt;80%&lt;/b&gt; &amp; rising" in body["text"]
        assert "projected 6411.3 kWh" in body["text"]


def test_telegram_text_fits_the_limit() -> None:
    cfg = hook("https://api.telegram.org/botX/sendMessage", format="telegram", chat_id="1")
    body = wh.event_body(event(0, message="<&>" * 5000), T0)
    text = json.loads(wh.render(cfg, json.dumps(body)))["text"]
    assert len(text) <= wh.TELEGRAM_MAX_CHARS


def test_telegram_retry_after_in_body_is_honoured(db: Path, receiver: Receiver) -> None:
    receiver.start()
    url = receiver.url
    hooks = [hook(url, format="telegram", chat_id="1")]
    put(db, [event()], hooks)

    def post(u: str, body: bytes, headers: Any, timeout_s: float) -> wh.HttpResponse:
        return wh.HttpResponse(429, {}, b'{"ok":false,"parameters":{"retry_after":42}}')

    s = wh.WebhookSender(hooks, db, _http_post=post)
    assert s.deliver_due(T0).failed == 1
    assert rows(db)[0][4] == T0 + 42


# --------------------------------------------------------------------------- enqueue


def test_filters_choose_the_webhooks(db: Path) -> None:
    alerts = hook("https://a.example/h", events=["alert.*"])
    orders = hook("https://o.example/h", events=["order.*"])
    everything = hook("https://all.example/h")
    stale = hook("https://s.example/h", events=["meter.stale", "order.failed"])
    hooks = [alerts, orders, everything, stale]
    kinds = ["alert.firing", "order.failed", "meter.stale", "meter.recovered"]
    ids = put(db, [event(i, kind=k) for i, k in enumerate(kinds)], hooks)
    got: dict[str, set[str]] = {}
    for event_id, key, *_ in rows(db):
        got.setdefault(event_id, set()).add(key)
    k = wh.webhook_key
    assert got[ids[0]] == {k(alerts), k(everything)}
    assert got[ids[1]] == {k(orders), k(everything), k(stale)}
    assert got[ids[2]] == {k(everything), k(stale)}
    assert got[ids[3]] == {k(everything)}


def test_enqueue_records_the_event_and_is_idempotent(db: Path) -> None:
    hooks = [hook("https://a.example/h")]
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    eid = wh.enqueue(conn, event(0, event_id="fixed-id", at="2026-11-27T09:00:00+07:00"),
                     hooks, T0)
    again = wh.enqueue(conn, event(0, event_id="fixed-id"), hooks, T0 + 5)
    conn.execute("COMMIT")
    assert eid == again == "fixed-id"
    row = conn.execute("SELECT kind, severity, rule, scope, at, body FROM events").fetchall()
    assert len(row) == 1
    kind, severity, rule, scope, at, body = row[0]
    assert (kind, severity, rule, scope) == ("alert.firing", "warning", "monthly-cap", "site")
    assert at == 1_795_744_800.0
    assert json.loads(body)["at"] == "2026-11-27T02:00:00Z"
    assert len(rows(db)) == 1
    conn.execute("BEGIN")
    generated = wh.enqueue(conn, {"kind": "meter.stale"}, hooks, T0 + 0.5)
    conn.execute("COMMIT")
    (stored,) = conn.execute("SELECT body FROM events WHERE event_id = ?",
                             (generated,)).fetchone()
    assert json.loads(stored) == {"event_id": generated, "kind": "meter.stale",
                                  "severity": "info", "at": "2026-11-18T11:06:40.500Z"}
    with pytest.raises(wh.EventError):
        wh.enqueue(conn, {"severity": "warning"}, hooks, T0)
    with pytest.raises(wh.EventError):
        wh.enqueue(conn, {"kind": "x", "at": "yesterday"}, hooks, T0)
    conn.close()


def test_rolled_back_enqueue_leaves_nothing(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    wh.enqueue(conn, event(), [hook("https://a.example/h")], T0)
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    conn.close()
    assert rows(db) == []


def test_backlog_counts_and_ages(db: Path) -> None:
    a, b = hook("https://a.example/h"), hook("https://b.example/h", events=["order.*"])
    put(db, [event(0)], [a, b], now=T0)
    put(db, [event(1, kind="order.issued")], [a, b], now=T0 + 100)
    conn = sqlite3.connect(db)
    got = wh.backlog(conn, T0 + 160)
    conn.close()
    assert got.pending == 3 and got.oldest_age_s == 160
    assert got.per_webhook == {wh.webhook_key(a): 2, wh.webhook_key(b): 1}
    assert wh.webhook_key(a) != wh.webhook_key(hook("https://a.example/h", format="slack"))
    assert wh.webhook_key(a) == wh.webhook_key(hook("https://a.example/h", secret="rotated"))


# --------------------------------------------------------------------------- docs


def _docs_snippet() -> str:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (snippet,) = [str(b) for b in blocks if "def verify_signature" in b]
    return snippet


def test_the_receiver_snippet_in_the_docs_verifies_a_real_delivery(
    db: Path, receiver: Receiver
) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_docs_snippet(), str(DOCS), "exec"), namespace)
    verify = namespace["verify_signature"]
    receiver.start()
    hooks = [hook(receiver.url)]
    put(db, [event()], hooks)
    sender(db, hooks).deliver_due(T0)
    (g,) = receiver.got
    header = g.headers["x-energy-monitor-signature"]
    assert verify(SECRET.encode(), g.body, header)
    assert not verify(SECRET.encode(), g.body + b" ", header)
    assert not verify(b"wrong", g.body, header)


# --------------------------------------------------------------------------- layout


def test_the_outbox_holds_all_sql_and_render_does_no_io() -> None:
    """The package's three jobs stay apart: SQL only in outbox.py; render.py imports
    no database, network or clock module."""
    from tests.test_actions_logic import sql_sites  # noqa: PLC0415

    pkg = Path(wh.__file__).parent
    assert {p.name for p in pkg.glob("*.py")} == {"__init__.py", "outbox.py", "render.py",
                                                  "send.py"}
    assert sql_sites(pkg / "outbox.py")
    assert [s for p in sorted(pkg.glob("*.py")) if p.name != "outbox.py"
            for s in sql_sites(p)] == []
    imported = set()
    for node in ast.walk(ast.parse((pkg / "render.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not imported & {"sqlite3", "urllib", "http", "socket", "time", "random",
                           "monitor.store.db", "monitor.store.kv"}, imported
