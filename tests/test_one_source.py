"""One implementation each of time formatting, period bounds, retry / Retry-After and
the store opener, and the callers agree because they all use it."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor import config
from monitor.app import status as status_mod
from monitor.config import Config
from monitor.core import periods
from monitor.core.timefmt import local_iso, parse_rfc3339, rfc3339
from monitor.outputs import exporter
from monitor.outputs.retry import RETRY_AFTER_MIN_S, Backoff, retry_after_s
from monitor.store import db
from monitor.store.ledger import Store
from monitor.store.schema import MIGRATIONS

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z


# --------------------------------------------------------------------------- time


@pytest.mark.parametrize(("ts", "text"), [
    (1_795_802_400.0, "2026-11-27T18:00:00Z"),
    (1_795_802_400.5, "2026-11-27T18:00:00.500Z"),
    (1_795_802_400.25, "2026-11-27T18:00:00.250Z"),
])
def test_rfc3339_writes_milliseconds_only_when_not_whole(ts: float, text: str) -> None:
    assert rfc3339(ts) == text
    assert parse_rfc3339(text) == ts


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False).map(lambda x: round(x, 3)))
def test_rfc3339_round_trips_to_the_millisecond(ts: float) -> None:
    assert abs(parse_rfc3339(rfc3339(ts)) - ts) < 1e-3


@pytest.mark.parametrize("bad", ["2026-11-27T18:00:00", "tomorrow", "", "2026-13-01T00:00:00Z"])
def test_parse_rfc3339_refuses_times_without_an_offset_or_not_times(bad: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339(bad)


def test_offsets_and_lower_case_are_read() -> None:
    assert parse_rfc3339("2026-11-28T02:00:00+08:00") == parse_rfc3339("2026-11-27T18:00:00Z")
    assert parse_rfc3339("2026-11-27t18:00:00z") == 1_795_802_400.0
    assert local_iso(1_795_802_400.0, ZoneInfo("Asia/Irkutsk")) == "2026-11-28T02:00:00+08:00"


#: modules allowed to read ISO times themselves, and why
OWN_ISO_PARSING = {
    "monitor/core/timefmt.py": "the one implementation",
    "monitor/intake/parsers/tasmota.py": "Tasmota's Time is the device's local time, no offset",
    "sim/simulate.py": "the simulator's --start option (not the daemon)",
}


def test_no_module_formats_or_parses_instants_itself() -> None:
    """Time formatting used to be written seven times and disagreed; now a
    module that formats an instant with ``isoformat(timespec=...)`` or parses
    one with ``fromisoformat`` outside core.timefmt fails this test."""
    root = Path(__file__).resolve().parent.parent
    found = []
    sources = [*root.joinpath("monitor").rglob("*.py"), *root.joinpath("sim").rglob("*.py")]
    for path in sorted(sources):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr == "isoformat" and any(k.arg == "timespec" for k in node.keywords):
                if rel != "monitor/core/timefmt.py":
                    found.append(f"{rel}:{node.lineno} formats an instant")
            elif node.func.attr == "fromisoformat" and rel not in OWN_ISO_PARSING:
                found.append(f"{rel}:{node.lineno} parses an instant")
    assert found == []


# --------------------------------------------------------------------------- periods


def _cfg(tz: str) -> Config:
    return config.parse({"site": {"id": "s", "category": "individual", "timezone": tz},
                         "sources": [{"topic": "m/#", "format": "json"}]})


@given(st.floats(min_value=1.6e9, max_value=2.2e9),
       st.sampled_from(["Asia/Irkutsk", "Europe/Moscow", "America/Chicago", "UTC",
                        "Australia/Lord_Howe", "Europe/Berlin"]))
def test_check_page_and_report_agree_on_the_month(ts: float, tz: str) -> None:
    """The check (period_of), the status page (month_bounds) and the report
    (periods.month of the label) give the same month for any instant."""
    p = periods.period_of("calendar_month", ts, tz)
    assert p.contains(ts)
    first, last, label = status_mod.month_bounds(ts, _cfg(tz))
    assert (first, last, label) == (p.first_day.isoformat(), p.last_day.isoformat(), p.label)
    again = periods.month(label, tz)
    assert (again.start_ts, again.end_ts) == (p.start_ts, p.end_ts)
    assert periods.period_bounds("calendar_month", ts, tz) == (p.start_ts, p.end_ts, p.label)


@given(st.floats(min_value=1.6e9, max_value=2.2e9),
       st.sampled_from(periods.PERIODS), st.sampled_from(["Asia/Irkutsk", "America/Chicago"]))
def test_periods_tile_time(ts: float, kind: str, tz: str) -> None:
    p = periods.period_of(kind, ts, tz)
    nxt = periods.period_of(kind, p.end_ts, tz)
    prev = periods.period_of(kind, p.start_ts - 1e-3, tz)
    assert nxt.start_ts == p.end_ts and prev.end_ts == p.start_ts


def test_a_month_across_dst_has_its_real_length() -> None:
    p = periods.month("2026-03", "America/Chicago")
    assert p.seconds == 31 * 86400 - 3600 and len(p.days) == 31


# --------------------------------------------------------------------------- retry


@pytest.mark.parametrize(("value", "want"), [
    ("120", 120.0),
    ("1.5", 1.5),
    ("0", RETRY_AFTER_MIN_S),
    ("99999999", 3600.0),
    ("Wed, 18 Nov 2026 11:08:40 GMT", 120.0),
    ("Wed, 18 Nov 2026 11:08:40", 120.0),  # no zone: an HTTP-date is GMT
    ("Wed, 18 Nov 2026 11:00:00 GMT", RETRY_AFTER_MIN_S),  # in the past
    ("1e3", None), ("-5", None), ("+5", None), ("inf", None), ("nan", None), ("soon", None),
    ("", None), (None, None),
])
def test_retry_after_one_reading_for_every_caller(value: str | None, want: float | None) -> None:
    assert retry_after_s(value, T0) == want


def test_exporter_reads_retry_after_with_the_same_rules() -> None:
    for value in ("1.5", "1e3", "-5"):
        err = exporter.translate_status(429, "busy", value)
        got = getattr(err, "retry_after_s", None)
        want = retry_after_s(value, T0)
        assert (got is None) == (want is None), value


@given(st.integers(min_value=1, max_value=200), st.floats(min_value=0, max_value=0.999))
def test_backoff_is_capped_and_half_fixed(attempt: int, rnd: float) -> None:
    b = Backoff(5.0, 600.0)
    d = b.delay(attempt, rnd)
    assert b.ceiling(attempt) / 2 <= d <= b.ceiling(attempt) <= 600.0


def test_backoff_refuses_a_nonsense_policy() -> None:
    with pytest.raises(ValueError, match="base_s"):
        Backoff(0.0, 10.0)


# --------------------------------------------------------------------------- store opener


def test_every_connection_gets_the_durable_pragmas(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "m.db")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000


def test_readers_never_write_and_never_migrate(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with pytest.raises(db.StoreError, match="no store"):
        Store(path, readonly=True)
    assert not path.exists()
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    first, sql = min(MIGRATIONS)
    raw.executescript(sql)  # the store as the first release left it
    raw.execute("INSERT INTO schema_migrations VALUES (?, 0)", (first,))
    raw.commit()
    with pytest.raises(db.StoreError, match="start the daemon"):
        Store(path, readonly=True)
    assert db.schema_version(raw) == first  # the reader did not migrate it
    raw.close()
    Store(path).close()  # the daemon migrates
    reader = Store(path, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.conn.execute("INSERT INTO kv (key, value) VALUES ('x', 'y')")
    reader.close()


def test_an_older_daemon_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO schema_migrations VALUES (?, 0)", (db.SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(db.StoreError, match="newer"):
        Store(path, readonly=True)
    with pytest.raises(db.StoreError, match="newer"):
        Store(path)


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "m.db")
    db.migrate(conn)
    with pytest.raises(RuntimeError), db.transaction(conn):
        conn.execute("INSERT INTO kv (key, value) VALUES ('a', '1')")
        raise RuntimeError("boom")
    assert conn.execute("SELECT count(*) FROM kv WHERE key = 'a'").fetchone()[0] == 0
    assert not conn.in_transaction
