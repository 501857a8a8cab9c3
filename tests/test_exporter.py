"""The exporter against a real VictoriaMetrics (influxdb-client -> /api/v2/write).

Faults are injected by a real local HTTP server (:class:`tests.tsdb.FaultProxy`)
between the exporter and VictoriaMetrics.  Time is a fake clock handed to the
exporter, so backoff is checked without waiting and without wall-clock asserts.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from monitor.config import InfluxConfig
from monitor.outputs.exporter import (
    DEAD_LETTER_KIND,
    ExportClosedError,
    Exporter,
)
from monitor.outputs.lineproto import event_line, rule_line
from tests.tsdb import (
    VM,
    FaultProxy,
    Row,
    Series,
    add_meter,
    add_readings,
    open_store,
    victoria_metrics,
)

SITE = "irk-01"
T0 = 1_790_000_000.0  # 2026-09-21, well inside VictoriaMetrics' accepted range
TOKEN = "s3cr3t-token-value"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    with victoria_metrics(tmp_path / "vm") as server:
        yield server


@pytest.fixture
def proxy(vm: VM) -> Iterator[FaultProxy]:
    with FaultProxy(vm.url) as p:
        yield p


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "monitor.db"
    conn = open_store(path)
    add_meter(conn, "rack-07", "hall-a", "tasmota")
    add_meter(conn, "rack-08", "hall-b", "shelly_gen2")
    try:
        yield path, conn
    finally:
        conn.close()


def cfg(url: str, **kw: object) -> InfluxConfig:
    base: dict[str, object] = {"url": url, "org": "mining", "bucket": "energy",
                               "token": SecretStr(TOKEN), "batch_size": 50, "timeout_s": 5.0}
    base.update(kw)
    return InfluxConfig.model_validate(base)


def make_exporter(url: str, db: Path, clock: FakeClock | None = None,
                  **kw: object) -> Exporter:
    return Exporter(cfg(url, **kw), SITE, db, _clock=clock or FakeClock(),
                    _now=lambda: T0 + 86400, _random=lambda: 1.0)


def readings(meter: str, start: int, n: int, step_s: float = 10.0) -> list[Row]:
    return [(meter, T0 + (start + i) * step_s, 1000.0 + i, 100.0 + i / 100, 0.01,
             230.0, 4.5) for i in range(n)]


def by_key(series: list[Series], name: str) -> dict[str, Series]:
    return {s.labels["meter"]: s for s in series if s.name == name}


def assert_exactly_once(vm: VM, expected: dict[str, int]) -> None:
    """Each meter's energy_delta_kwh series has ``expected[meter]`` distinct samples
    and no timestamp twice."""
    got = by_key(vm.export('{__name__="energy_reading_energy_delta_kwh"}'),
                 "energy_reading_energy_delta_kwh")
    assert sorted(got) == sorted(expected)
    for meter, n in expected.items():
        ts = got[meter].timestamps_ms
        dupes = [t for t, c in Counter(ts).items() if c > 1]
        assert dupes == [], f"{meter}: {len(dupes)} timestamps written twice"
        assert len(ts) == n


def cursor(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


# --------------------------------------------------------------------------- happy path


def test_points_land_with_tags_fields_and_times(
        vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    add_readings(conn, readings("rack-07", 0, 30) + readings("rack-08", 0, 20))
    # a meter without a [[meters]] entry, and a reading with only some fields
    add_readings(conn, [("tasmota/pow9", T0 + 5.25, None, 42.5, 0.0, None, None)])
    conn.execute("INSERT INTO export_outbox (line) VALUES (?), (?)", (
        rule_line(SITE, "monthly-cap", "group:hall-a", 4812.0, 6000.0, 0.802, 6411.3, 1,
                  T0 + 60),
        event_line(SITE, "alert.firing", "monthly-cap", "80% of the monthly limit", T0 + 60),
    ))
    exporter = make_exporter(vm.url, path)
    result = exporter.flush(max_batches=100)
    exporter.close()

    assert result.ok and result.readings == 51 and result.outbox == 2
    assert result.batches == 2  # batch_size 50
    series = vm.export()
    power = by_key(series, "energy_reading_power_w")
    assert power["rack-07"].labels == {"site": SITE, "meter": "rack-07", "group": "hall-a",
                                       "format": "tasmota"}
    assert power["rack-08"].labels["format"] == "shelly_gen2"
    assert power["rack-07"].timestamps_ms == [int((T0 + i * 10) * 1000) for i in range(30)]
    assert power["rack-07"].values == [1000.0 + i for i in range(30)]
    assert "tasmota/pow9" not in power  # NULL power_w is left out, not written as 0
    kwh = by_key(series, "energy_reading_energy_kwh")
    assert kwh["tasmota/pow9"].labels == {"site": SITE, "meter": "tasmota/pow9"}
    assert kwh["tasmota/pow9"].timestamps_ms == [int(T0 * 1000) + 5250]
    for name in ("voltage_v", "current_a", "energy_delta_kwh"):
        assert len(by_key(series, f"energy_reading_{name}")["rack-08"].timestamps_ms) == 20
    state = [s for s in series if s.name == "energy_rule_state"]
    assert [(s.labels, s.values) for s in state] == [
        ({"site": SITE, "rule": "monthly-cap", "scope": "group:hall-a"}, [1.0])]
    events = [s for s in series if s.name == "energy_event_message"]
    assert [s.labels["kind"] for s in events] == ["alert.firing"]
    assert_exactly_once(vm, {"rack-07": 30, "rack-08": 20, "tasmota/pow9": 1})

    # cursors at the end; the exported outbox is trimmed to its newest row
    assert cursor(conn, "export.readings") == 51
    assert cursor(conn, "export.outbox") == 2
    assert conn.execute("SELECT id FROM export_outbox").fetchall() == [(2,)]
    backlog = exporter.backlog()
    assert backlog.rows == 0 and backlog.age_s is None
    assert exporter.health.healthy


def test_vm_keeps_duplicates_so_the_count_would_see_them(vm: VM) -> None:
    """The exactly-once checks mean something: a point written twice shows twice."""
    line = "energy_reading,meter=dup,site=s energy_delta_kwh=0.5 1790000000000000000"
    vm.write([line])
    vm.write([line])
    got = by_key(vm.export(), "energy_reading_energy_delta_kwh")
    assert got["dup"].timestamps_ms == [1_790_000_000_000] * 2


def test_flush_after_close_raises(vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    exporter = make_exporter(vm.url, store[0])
    exporter.close()
    with pytest.raises(ExportClosedError):
        exporter.flush()


def test_connection_factory_and_max_batches(
        vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    add_readings(conn, readings("rack-07", 0, 120))
    opened: list[sqlite3.Connection] = []

    def factory() -> sqlite3.Connection:
        c = sqlite3.connect(str(path), isolation_level=None)
        opened.append(c)
        return c

    exporter = Exporter(cfg(vm.url), SITE, factory, _clock=FakeClock())
    first = exporter.flush(max_batches=1)
    assert first.readings == 50 and first.more
    rest = exporter.flush(max_batches=10)
    assert rest.readings == 70 and not rest.more
    exporter.close()
    assert len(opened) == 2
    assert_exactly_once(vm, {"rack-07": 120})


# --------------------------------------------------------------------------- outages


def test_outage_replay_delivers_every_reading_exactly_once(
        vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    clock = FakeClock()
    exporter = make_exporter(vm.url, path, clock, timeout_s=2.0)
    add_readings(conn, readings("rack-07", 0, 40) + readings("rack-08", 0, 40))
    assert exporter.flush(max_batches=100).ok

    vm.stop()
    add_readings(conn, readings("rack-07", 40, 75) + readings("rack-08", 40, 60))
    failed = exporter.flush(max_batches=100)
    assert failed.error is not None and failed.readings == 0
    assert cursor(conn, "export.readings") == 80
    assert exporter.backlog().readings == 135
    assert exporter.health.healthy  # a short outage is not a health problem by itself
    assert exporter.health.consecutive_failures == 1
    # during the backoff nothing is tried, except by the last flush at shutdown
    assert exporter.flush().skipped
    assert not exporter.flush(ignore_backoff=True).skipped
    # more readings arrive during the outage; a retry after the backoff still fails
    add_readings(conn, readings("rack-07", 115, 10))
    clock.t += 3600
    assert exporter.flush().error is not None

    vm.start()
    clock.t += 3600
    done = exporter.flush(max_batches=100)
    assert done.ok and done.readings == 145 and not done.more
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 125, "rack-08": 100})
    assert exporter.backlog().rows == 0


def test_5xx_backs_off_exponentially_capped_then_recovers(
        proxy: FaultProxy, vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    clock = FakeClock()
    exporter = Exporter(cfg(proxy.url), SITE, path, backoff_base_s=2.0, backoff_max_s=30.0,
                        _clock=clock, _random=lambda: 1.0)
    add_readings(conn, readings("rack-07", 0, 10))
    proxy.fail(500, '{"code":"internal error","message":"engine down"}')
    delays = []
    for _ in range(6):
        result = exporter.flush()
        assert result.error is not None and "engine down" in result.error
        delays.append(result.retry_in_s)
        clock.t += result.retry_in_s
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert cursor(conn, "export.readings") == 0

    proxy.forward()
    assert exporter.flush().ok
    assert exporter.health.consecutive_failures == 0
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 10})


def test_backoff_has_jitter(store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    add_readings(conn, readings("rack-07", 0, 1))
    with FaultProxy("http://127.0.0.1:9") as proxy:
        proxy.fail(502)
        delays = []
        for r in (0.0, 0.5):
            clock = FakeClock()
            exporter = Exporter(cfg(proxy.url), SITE, path, backoff_base_s=4.0,
                                _clock=clock, _random=functools.partial(float, r))
            delays.append(exporter.flush().retry_in_s)
            exporter.close()
    assert delays == [2.0, 3.0]  # "equal jitter": half fixed, half random


def test_429_and_503_honour_retry_after(
        proxy: FaultProxy, vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    clock = FakeClock()
    exporter = make_exporter(proxy.url, path, clock)
    add_readings(conn, readings("rack-07", 0, 5))
    proxy.fail(429, '{"code":"too many requests","message":"slow down"}',
               {"Retry-After": "17"})
    assert exporter.flush().retry_in_s == 17.0
    clock.t += 16
    assert exporter.flush().skipped
    sent = len(proxy.requests)
    clock.t += 1
    proxy.fail(503, "maintenance", {"Retry-After": "42"})
    assert exporter.flush().retry_in_s == 42.0
    assert len(proxy.requests) == sent + 1
    proxy.forward()
    clock.t += 42
    assert exporter.flush().ok
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 5})


def test_timeouts_are_retried(proxy: FaultProxy, vm: VM,
                              store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    clock = FakeClock()
    exporter = make_exporter(proxy.url, path, clock, timeout_s=0.3)
    add_readings(conn, readings("rack-07", 0, 12))
    proxy.hang(30)
    result = exporter.flush()
    assert result.error is not None and "timed out" in result.error.lower()
    assert cursor(conn, "export.readings") == 0
    proxy.forward()
    # the 0.3 s timeout can also trip on a loaded machine while forwarding: what
    # matters is that a later flush succeeds and nothing is doubled
    for _ in range(5):
        clock.t += result.retry_in_s
        result = exporter.flush()
        if result.ok:
            break
    assert result.ok, result.error
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 12})


# --------------------------------------------------------------------------- bad lines


def test_400_bisects_dead_letters_the_bad_line_and_sends_the_rest(
        proxy: FaultProxy, vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    add_readings(conn, readings("rack-07", 0, 20))
    add_readings(conn, [("bad-meter", T0 + 3, 5.0, 1.0, 0.0, None, None)])
    add_readings(conn, readings("rack-08", 0, 19))
    proxy.reject_lines("energy_reading,meter=bad-meter,")
    exporter = make_exporter(proxy.url, path)
    result = exporter.flush(max_batches=1)
    assert result.ok and result.readings == 40 and result.dead_letters == 1
    # 40 lines in one batch: log2(40) ~ 6 levels, two requests per level at most
    assert result.requests <= 2 * 6 + 1
    rows = conn.execute("SELECT line, reason FROM export_dead_letters").fetchall()
    assert len(rows) == 1
    assert "meter=bad-meter" in rows[0][0]
    assert rows[0][1].startswith("HTTP 400: unable to parse") and "injected" in rows[0][1]
    assert cursor(conn, "export.readings") == 40

    # the dead letter is announced in InfluxDB too, by an event line in the outbox
    assert exporter.flush().outbox == 1
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 20, "rack-08": 19})
    events = [s for s in vm.export() if s.name == "energy_event_message"]
    assert [s.labels["kind"] for s in events] == [DEAD_LETTER_KIND]


# --------------------------------------------------------------------------- auth, backlog


def test_401_marks_unhealthy_calls_back_once_and_recovers(
        proxy: FaultProxy, vm: VM, store: tuple[Path, sqlite3.Connection],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path, conn = store
    clock = FakeClock()
    calls: list[str] = []
    exporter = Exporter(cfg(proxy.url), SITE, path, on_auth_failure=calls.append,
                        _clock=clock)
    add_readings(conn, readings("rack-07", 0, 3))
    proxy.fail(401, '{"code":"unauthorized","message":"unauthorized access"}')
    first = exporter.flush()
    clock.t += 3600
    second = exporter.flush()
    health = exporter.health
    assert not health.healthy
    assert any("token" in r and "unauthorized access" in r for r in health.reasons)
    assert len(calls) == 1 and "401" in calls[0]

    # the token was sent, but never logged or reported
    assert proxy.requests[0].authorization == f"Token {TOKEN}"
    for text in (caplog.text, str(first), str(second), str(health), calls[0],
                 repr(exporter.config)):
        assert TOKEN not in text

    proxy.forward()
    clock.t += 3600
    assert exporter.flush().ok
    assert exporter.health.healthy
    exporter.close()


def test_404_bucket_missing_is_unhealthy_without_auth_callback(
        proxy: FaultProxy, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    calls: list[str] = []
    exporter = Exporter(cfg(proxy.url), SITE, path, on_auth_failure=calls.append,
                        _clock=FakeClock())
    add_readings(conn, readings("rack-07", 0, 3))
    proxy.fail(404, '{"code":"not found","message":"bucket \\"energy\\" not found"}')
    exporter.flush()
    exporter.close()
    assert calls == []
    assert any("bucket" in r for r in exporter.health.reasons)


def test_backlog_over_limit_keeps_rows_and_is_unhealthy(
        proxy: FaultProxy, vm: VM, store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    clock = FakeClock()
    exporter = Exporter(cfg(proxy.url, max_backlog_rows=1000, batch_size=500), SITE, path,
                        max_backlog_age_s=7 * 86400, _clock=clock,
                        _now=lambda: T0 + 8 * 86400)
    add_readings(conn, readings("rack-07", 0, 700) + readings("rack-08", 0, 600))
    proxy.fail(500)
    exporter.flush()
    health = exporter.health
    assert not health.healthy
    assert any(r.startswith("backlog over limit") for r in health.reasons)
    assert any(r.startswith("backlog too old") for r in health.reasons)
    backlog = exporter.backlog()
    assert backlog.readings == 1300
    assert backlog.oldest_ts == T0 and backlog.age_s == 8 * 86400
    assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 1300

    proxy.forward()
    clock.t += 3600
    partial = exporter.flush(max_batches=1)
    assert partial.more
    # 800 rows left: under the row limit, but the oldest is still over a week old
    assert [r.split(":")[0] for r in exporter.health.reasons] == ["backlog too old"]
    assert exporter.flush(max_batches=10).ok
    assert exporter.health.healthy and exporter.health.reasons == ()
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 700, "rack-08": 600})


def test_cursor_restarts_when_ids_restart(vm: VM,
                                          store: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = store
    exporter = make_exporter(vm.url, path)
    add_readings(conn, readings("rack-07", 0, 30))
    assert exporter.flush().ok
    conn.execute("DELETE FROM readings")  # e.g. retention after a very long silence
    add_readings(conn, readings("rack-07", 30, 5))  # ids 1..5 again
    assert exporter.flush().readings == 5
    exporter.close()
    assert_exactly_once(vm, {"rack-07": 35})
