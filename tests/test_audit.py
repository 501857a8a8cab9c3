"""The hash-chained audit log on a real SQLite file: intact chains verify, any edit is found."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.store import audit
from monitor.store.schema import MIGRATIONS

T0 = 1_795_000_000.0
N = 6


def _migrate(conn: sqlite3.Connection) -> None:
    try:
        from monitor.store.db import migrate  # noqa: PLC0415 -- the store module is optional here
    except ImportError:
        for _, sql in sorted(MIGRATIONS):
            conn.executescript(sql)
    else:
        migrate(conn)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(tmp_path / "monitor.db", isolation_level=None)
    _migrate(c)
    yield c
    c.close()


def _fill(conn: sqlite3.Connection, n: int = N) -> list[audit.AuditEntry]:
    bodies: list[dict[str, Any]] = [
        {"config_sha256": "ab" * 32},
        {"rule": "monthly-cap", "scope": "site", "from": "ok", "to": "warning", "value": 4812.0},
        {"order_id": "01J", "meters": ["rack-07", "rack-08"], "reason": "6012.4 kWh > 6000"},
        {"event_id": "e1", "message": "Ангарск: 80% использовано", "ratio": 0.1 + 0.2},
        {"actor": "operator", "scope": "group:hall-a", "nested": {"b": 1, "a": [1.5, None]}},
        {"empty": {}},
    ]
    kinds = ["config.loaded", "rule.transition", "order.issued", "event", "operator.resume",
             "order.confirmed"]
    out = []
    conn.execute("BEGIN")
    for i in range(n):
        out.append(audit.append(conn, kinds[i % 6], bodies[i % 6], T0 + 60 * i + 0.25))
    conn.execute("COMMIT")
    return out


def test_empty_log_verifies(conn: sqlite3.Connection) -> None:
    result = audit.verify(conn)
    assert result.ok and result.checked == 0 and result.head is None


def test_untouched_log_verifies_and_links(conn: sqlite3.Connection) -> None:
    entries = _fill(conn)
    assert [e.seq for e in entries] == list(range(1, N + 1))
    assert entries[0].prev_hash == audit.GENESIS
    for a, b in itertools.pairwise(entries):
        assert b.prev_hash == a.hash
    result = audit.verify(conn)
    assert result.ok, result
    assert result.checked == N
    assert result.head == audit.Head(N, entries[-1].hash)
    assert audit.anchor(conn) == result.head
    assert "ok" in str(result)


def test_hash_definition_is_documented_one(conn: sqlite3.Connection) -> None:
    e = _fill(conn, 1)[0]
    payload = json.dumps({"seq": 1, "at": e.at, "kind": e.kind, "body": dict(e.body)},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert e.hash == hashlib.sha256(f"{'0' * 64}\n{payload}".encode()).hexdigest()


def test_canonical_json_rules() -> None:
    assert audit.canonical_json({"b": 1, "a": 4812.0, "c": "ё"}) == '{"a":4812.0,"b":1,"c":"ё"}'
    assert audit.canonical_json(0.1 + 0.2) == "0.30000000000000004"
    with pytest.raises(ValueError):
        audit.canonical_json(float("nan"))


def test_append_refuses_unhashable_body(conn: sqlite3.Connection) -> None:
    with pytest.raises(audit.AuditError):
        audit.append(conn, "event", {"x": float("inf")}, T0)
    with pytest.raises(audit.AuditError):
        audit.append(conn, "event", {"x": object()}, T0)
    with pytest.raises(audit.AuditError):
        audit.append(conn, "", {}, T0)


def _flip(value: Any) -> Any:
    """A one-byte (or one-ulp) change of a column value, keeping its type."""
    if isinstance(value, float):
        return value + 1e-6
    if isinstance(value, str):
        i = len(value) // 2
        ch = value[i]
        return value[:i] + ("x" if ch != "x" else "y") + value[i + 1:]
    raise AssertionError(value)


@pytest.mark.parametrize("column", ["at", "kind", "body", "prev_hash", "hash"])
@pytest.mark.parametrize("seq", range(1, N + 1))
def test_changed_byte_in_any_column_fails_at_that_entry(
    conn: sqlite3.Connection, column: str, seq: int
) -> None:
    _fill(conn)
    (value,) = conn.execute(f"SELECT {column} FROM audit WHERE seq = ?", (seq,)).fetchone()
    conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (_flip(value), seq))
    result = audit.verify(conn)
    assert not result.ok
    assert result.first_bad_seq == seq, result
    assert result.checked == seq - 1
    assert "BROKEN" in str(result)


@pytest.mark.parametrize("seq", range(1, N + 1))
def test_changed_seq_is_found(conn: sqlite3.Connection, seq: int) -> None:
    _fill(conn)
    conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq + 100, seq))
    result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == seq


def test_body_edit_that_keeps_the_json_value_is_found(conn: sqlite3.Connection) -> None:
    _fill(conn)
    (body,) = conn.execute("SELECT body FROM audit WHERE seq = 2").fetchone()
    conn.execute("UPDATE audit SET body = ? WHERE seq = 2", (body.replace(",", ", ", 1),))
    result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == 2 and "canonical" in result.reason


def test_rewritten_entry_with_recomputed_hash_breaks_the_next_link(
    conn: sqlite3.Connection,
) -> None:
    entries = _fill(conn)
    e = entries[2]
    forged = {**e.body, "reason": "nothing happened"}
    conn.execute(
        "UPDATE audit SET body = ?, hash = ? WHERE seq = 3",
        (audit.canonical_json(forged), audit.entry_hash(e.prev_hash, 3, e.at, e.kind, forged)),
    )
    result = audit.verify(conn)
    assert not result.ok
    assert result.first_bad_seq == 4 and "prev_hash" in result.reason


def test_deleted_middle_entry_is_found(conn: sqlite3.Connection) -> None:
    _fill(conn)
    conn.execute("DELETE FROM audit WHERE seq = 3")
    result = audit.verify(conn)
    assert not result.ok
    assert result.first_bad_seq == 3 and "missing" in result.reason
    assert result.checked == 2


def test_reordered_entries_are_found(conn: sqlite3.Connection) -> None:
    _fill(conn)
    conn.execute("BEGIN")
    conn.execute("UPDATE audit SET seq = -1 WHERE seq = 3")
    conn.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    conn.execute("UPDATE audit SET seq = 4 WHERE seq = -1")
    conn.execute("COMMIT")
    result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == 3


def test_tail_truncation_is_found_by_the_anchor(conn: sqlite3.Connection) -> None:
    _fill(conn)
    conn.execute("DELETE FROM audit WHERE seq > 4")
    result = audit.verify(conn)
    assert not result.ok
    assert result.first_bad_seq == 5 and "tail" in result.reason
    assert result.checked == 4


def test_truncation_stays_visible_after_the_next_append(conn: sqlite3.Connection) -> None:
    _fill(conn)
    conn.execute("DELETE FROM audit WHERE seq > 4")
    conn.execute("BEGIN")
    entry = audit.append(conn, "config.loaded", {"config_sha256": "cd" * 32}, T0 + 3600)
    conn.execute("COMMIT")
    assert entry.seq == 6  # seq 5 is the record of the mismatch
    (kind, body) = conn.execute("SELECT kind, body FROM audit WHERE seq = 5").fetchone()
    assert kind == audit.HEAD_MISMATCH
    assert json.loads(body)["anchor_seq"] == N and json.loads(body)["found_seq"] == 4
    result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == 5 and "removed" in result.reason


def test_deleted_anchor_is_found(conn: sqlite3.Connection) -> None:
    _fill(conn)
    conn.execute("DELETE FROM kv WHERE key = 'audit.head'")
    result = audit.verify(conn)
    assert not result.ok and "anchor" in result.reason


def test_truncation_with_a_forged_anchor_is_found_by_an_off_site_head(
    conn: sqlite3.Connection,
) -> None:
    entries = _fill(conn)
    shipped = audit.Head(entries[-1].seq, entries[-1].hash)
    assert audit.verify(conn, expected=shipped).ok
    conn.execute("DELETE FROM audit WHERE seq > 4")
    conn.execute(
        "UPDATE kv SET value = ? WHERE key = 'audit.head'",
        (audit.canonical_json({"seq": 4, "hash": entries[3].hash}),),
    )
    assert audit.verify(conn).ok  # the local anchor alone cannot tell: documented limit
    result = audit.verify(conn, expected=shipped)
    assert not result.ok and result.first_bad_seq == 5


def test_rollback_leaves_no_entry(conn: sqlite3.Connection) -> None:
    _fill(conn, 2)
    conn.execute("BEGIN")
    audit.append(conn, "event", {"x": 1}, T0 + 999)
    conn.execute("ROLLBACK")
    assert audit.verify(conn).checked == 2
    assert audit.verify(conn).ok


def test_export_selects_by_time_and_round_trips(conn: sqlite3.Connection) -> None:
    entries = _fill(conn)
    got = audit.export(conn, T0 + 60, T0 + 60 * 4)
    assert [e.seq for e in got] == [2, 3, 4]
    assert got == entries[1:4]
    assert json.loads(json.dumps([e.as_dict() for e in got]))[0]["hash"] == entries[1].hash
    assert [e.seq for e in audit.iter_entries(conn, after_seq=4)] == [5, 6]


def test_two_writers_never_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    a = sqlite3.connect(path, isolation_level=None)
    _migrate(a)
    b = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    a.execute("BEGIN IMMEDIATE")
    audit.append(a, "event", {"by": "a"}, T0)
    with pytest.raises(sqlite3.OperationalError):  # b waits for a's write lock, then gives up
        b.execute("BEGIN IMMEDIATE")
    a.execute("COMMIT")
    b.execute("BEGIN IMMEDIATE")
    assert audit.append(b, "event", {"by": "b"}, T0 + 1).seq == 2
    b.execute("COMMIT")
    assert audit.verify(a).ok
    a.close()
    b.close()


def test_verify_reads_one_snapshot_while_the_daemon_appends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon appends between verify's read of the anchor and its read of the rows:
    verify must still see one consistent log (it runs in one read transaction)."""
    path = tmp_path / "a.db"
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("PRAGMA journal_mode=WAL")
    _migrate(reader)
    writer = sqlite3.connect(path, isolation_level=None)
    for i in range(3):
        writer.execute("BEGIN IMMEDIATE")
        audit.append(writer, "event", {"i": i}, 1000.0 + i)
        writer.execute("COMMIT")
    real_anchor = audit.anchor

    def anchor_then_append(c: sqlite3.Connection) -> audit.Head | None:
        found = real_anchor(c)
        if c is not reader:  # append() reads the anchor too
            return found
        writer.execute("BEGIN IMMEDIATE")
        audit.append(writer, "event", {"i": "late"}, 2000.0)
        writer.execute("COMMIT")
        return found

    monkeypatch.setattr(audit, "anchor", anchor_then_append)
    result = audit.verify(reader)
    assert result.ok, result
    monkeypatch.setattr(audit, "anchor", real_anchor)
    assert audit.verify(reader).checked == 4
