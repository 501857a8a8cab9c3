"""The tamper-evident audit log: a hash chain over the ``audit`` table.

Every entry ``(seq, at, kind, body, prev_hash, hash)`` is linked to the one
before it::

    hash = sha256_hex(prev_hash + "\\n" + canonical_json({"seq", "at", "kind", "body"}))

with ``prev_hash`` of entry 1 being 64 zeros (:data:`GENESIS`).  ``seq`` runs
1, 2, 3, ... without gaps; ``at`` is Unix seconds (float); ``body`` is stored as
its canonical JSON text (see :func:`canonical_json`).

The latest ``{"seq", "hash"}`` is also written to ``kv`` key ``audit.head``
(the *anchor*) in the same transaction, so that removing entries from the end
of the log is detectable.  See ``docs/audit.md`` for what this does and does not
protect against.

Threading: plain functions over a connection the caller owns.  :func:`append`
does not commit; the caller's transaction makes the entry durable together with
the change it records.  Two writers racing for the same ``seq`` make the second
``INSERT`` fail (primary key), so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.store import kv
from monitor.store.db import snapshot

GENESIS = "0" * 64
ANCHOR_KEY = "audit.head"
HEAD_MISMATCH = "audit.head_mismatch"

# Kinds written by the rest of the daemon (informative; any non-empty kind is accepted).
KINDS = (
    "config.loaded",
    "rule.transition",
    "event",
    "order.issued",
    "order.confirmed",
    "order.failed",
    "operator.resume",
    HEAD_MISMATCH,
)


class AuditError(Exception):
    """An entry cannot be written (body not serialisable, bad time or kind)."""


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed: stable across runs and Python versions.

    Keys sorted, no whitespace (``separators=(",", ":")``), non-ASCII kept as
    UTF-8 (``ensure_ascii=False``), floats as ``repr`` (shortest round-trip form,
    so ``4812.0`` stays ``4812.0`` and ``1`` stays an integer), NaN and
    infinities refused.  Raises :class:`ValueError` or :class:`TypeError`.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(prev_hash: str, seq: int, at: float, kind: str, body: Mapping[str, Any]) -> str:
    """The hash of one entry given the hash of the one before it."""
    payload = canonical_json({"seq": seq, "at": at, "kind": kind, "body": body})
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    kind: str
    body: Mapping[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for reports and ``export``)."""
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "body": dict(self.body),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class Head:
    """The newest entry's position: what to ship off-site to detect a rewritten chain."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``checked`` counts the entries found intact before the first problem (all
    of them when ``ok``).  ``first_bad_seq`` is the sequence number of the
    first entry that is changed, missing or out of place (``None`` when ``ok``
    or when the problem is not tied to one entry, e.g. a missing anchor).
    """

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""
    head: Head | None = None

    def __str__(self) -> str:
        if self.ok:
            head = f", head {self.head.seq} {self.head.hash}" if self.head else ""
            return f"audit log ok: {self.checked} entries{head}"
        where = f"entry {self.first_bad_seq}: " if self.first_bad_seq is not None else ""
        return f"audit log BROKEN at {where}{self.reason} ({self.checked} entries intact before)"


# --------------------------------------------------------------------------- writing


def head(conn: sqlite3.Connection) -> Head | None:
    """The last entry in the table (not the anchor), or ``None`` for an empty log."""
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return Head(int(row[0]), str(row[1])) if row else None


def anchor(conn: sqlite3.Connection) -> Head | None:
    """The head recorded in ``kv 'audit.head'``; ``None`` if absent or unreadable."""
    raw = kv.get(conn, ANCHOR_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return Head(int(data["seq"]), str(data["hash"]))
    except (ValueError, TypeError, KeyError):
        return None


def _insert(
    conn: sqlite3.Connection, prev: Head | None, kind: str, body: Mapping[str, Any], at: float
) -> AuditEntry:
    seq = prev.seq + 1 if prev else 1
    prev_hash = prev.hash if prev else GENESIS
    body = dict(body)
    try:
        body_text = canonical_json(body)
        digest = entry_hash(prev_hash, seq, at, kind, body)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"{kind}: body is not plain JSON: {exc}") from exc
    conn.execute(
        "INSERT INTO audit (seq, at, kind, body, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?)",
        (seq, at, kind, body_text, prev_hash, digest),
    )
    kv.put(conn, ANCHOR_KEY, canonical_json({"seq": seq, "hash": digest}))
    return AuditEntry(seq, at, kind, body, prev_hash, digest)


def append(conn: sqlite3.Connection, kind: str, body: Mapping[str, Any], at: float) -> AuditEntry:
    """Append one entry and move the anchor; does not commit (the caller owns the transaction).

    ``body`` must be plain JSON (dicts, lists, str, int, finite float, bool,
    None).  ``at`` is Unix seconds.  Raises :class:`AuditError` for a body or
    time that cannot be hashed, :class:`sqlite3.IntegrityError` if another
    writer appended the same ``seq`` first (roll back and retry).

    If the anchor does not match the last entry (entries were removed from the
    end, or the anchor was deleted), an ``audit.head_mismatch`` entry recording
    both is written first, so the evidence survives in the chain instead of
    being overwritten by the new anchor; :func:`verify` reports it.
    """
    if not kind or not isinstance(kind, str):
        raise AuditError("kind must be a non-empty string")
    try:
        at = float(at)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"{kind}: at must be Unix seconds, not {at!r}") from exc
    if not math.isfinite(at):
        raise AuditError(f"{kind}: at must be finite, not {at!r}")
    last = head(conn)
    anchored = anchor(conn)
    if last != anchored and not (last is None and anchored is None):
        record = _insert(conn, last, HEAD_MISMATCH, _mismatch_body(last, anchored), at)
        last = Head(record.seq, record.hash)
    return _insert(conn, last, kind, body, at)


def _mismatch_body(found: Head | None, anchored: Head | None) -> dict[str, Any]:
    return {
        "anchor_seq": anchored.seq if anchored else None,
        "anchor_hash": anchored.hash if anchored else None,
        "found_seq": found.seq if found else 0,
        "found_hash": found.hash if found else GENESIS,
    }


# --------------------------------------------------------------------------- reading


def _row_entry(row: tuple[Any, ...]) -> AuditEntry:
    seq, at, kind, body, prev_hash, digest = row
    return AuditEntry(int(seq), float(at), str(kind), json.loads(body), str(prev_hash), str(digest))


def export(conn: sqlite3.Connection, start: float, end: float) -> list[AuditEntry]:
    """Entries with ``start <= at < end`` (Unix seconds), in ``seq`` order, for reports.

    The entries are returned as stored; run :func:`verify` to know whether they
    can be trusted.  Each entry carries ``prev_hash`` and ``hash`` so a reader of
    the export can check the links within the exported range.
    """
    rows = conn.execute(
        "SELECT seq, at, kind, body, prev_hash, hash FROM audit "
        "WHERE at >= ? AND at < ? ORDER BY seq",
        (start, end),
    )
    return [_row_entry(r) for r in rows]


def iter_entries(conn: sqlite3.Connection, after_seq: int = 0) -> Iterator[AuditEntry]:
    """All entries after ``after_seq``, in order (streams; does not load the table)."""
    rows = conn.execute(
        "SELECT seq, at, kind, body, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq",
        (after_seq,),
    )
    for r in rows:
        yield _row_entry(r)


# --------------------------------------------------------------------------- verifying


def _check_row(row: tuple[Any, ...], expected_seq: int, prev_hash: str) -> str:
    """The reason this row is bad, or ``""`` if it is intact and linked to ``prev_hash``."""
    seq, at, kind, body_text, stored_prev, stored_hash = row
    if not all(isinstance(v, str) for v in (kind, body_text, stored_prev, stored_hash)):
        return "a column has the wrong type"
    if not isinstance(at, float):
        return f"at has the wrong type ({type(at).__name__})"
    try:
        body = json.loads(body_text)
    except ValueError:
        return "body is not valid JSON"
    if not isinstance(body, dict):
        return "body is not a JSON object"
    try:
        canonical = canonical_json(body)
    except ValueError:
        return "body holds a value that cannot be hashed"
    if canonical != body_text:
        return "body is not in canonical form (it was edited)"
    if stored_prev != prev_hash:
        what = "genesis" if expected_seq == 1 else f"the hash of entry {expected_seq - 1}"
        return f"prev_hash does not match {what}"
    if entry_hash(prev_hash, seq, at, kind, body) != stored_hash:
        return "hash does not match the entry's content"
    if kind == HEAD_MISMATCH:
        found, anchored = body.get("found_seq"), body.get("anchor_seq")
        if anchored is None:
            return f"the head anchor was missing when this entry was written (log had {found})"
        return (
            f"entries after {found} (up to {anchored}) were removed before this entry was written"
        )
    return ""


def verify(conn: sqlite3.Connection, expected: Head | None = None) -> VerifyResult:
    """See :func:`_verify`.  Reads the anchor and the chain in one read transaction
    (when the caller has none open), so a daemon appending meanwhile cannot make a
    consistent log look broken."""
    if conn.in_transaction:
        return _verify(conn, expected)
    with snapshot(conn):  # deferred: a WAL snapshot from the first read on
        return _verify(conn, expected)


def _verify(conn: sqlite3.Connection, expected: Head | None = None) -> VerifyResult:
    """Recompute the whole chain; report the first entry that is changed, missing or moved.

    Detected: a changed byte in any column of any entry, a deleted or inserted
    entry (``seq`` gap or broken link), reordered entries, entries removed from
    the end while the anchor was left (or after which something was appended),
    a deleted anchor.  ``expected`` is a head kept elsewhere (off-site copy,
    webhook receiver, InfluxDB); when given, the chain must contain it.
    Read-only; streams the table.
    """
    prev_hash = GENESIS
    checked = 0
    last: Head | None = None
    anchored = anchor(conn)
    anchor_raw = kv.get(conn, ANCHOR_KEY)
    rows = conn.execute("SELECT seq, at, kind, body, prev_hash, hash FROM audit ORDER BY seq")
    for row in rows:
        seq = row[0]
        expected_seq = checked + 1
        if not isinstance(seq, int) or seq < expected_seq:
            return VerifyResult(False, checked, seq, "unexpected sequence number")
        if seq > expected_seq:
            return VerifyResult(
                False, checked, expected_seq, f"entry is missing (next entry found is {seq})"
            )
        reason = _check_row(row, expected_seq, prev_hash)
        if not reason and anchored and seq == anchored.seq and row[5] != anchored.hash:
            reason = "hash differs from the anchored head"
        if not reason and expected and seq == expected.seq and row[5] != expected.hash:
            reason = "hash differs from the expected head kept elsewhere"
        if reason:
            return VerifyResult(False, checked, seq, reason)
        prev_hash = row[5]
        checked += 1
        last = Head(seq, prev_hash)
    found = last.seq if last else 0
    if anchor_raw is not None and anchored is None:
        return VerifyResult(False, checked, None, "the head anchor (kv 'audit.head') is unreadable")
    if anchored is None and last is not None:
        return VerifyResult(False, checked, None, "the head anchor (kv 'audit.head') is missing")
    if anchored is not None and anchored.seq > found:
        return VerifyResult(
            False, checked, found + 1,
            f"the log ends at entry {found} but the anchor says {anchored.seq}: tail removed",
        )
    if anchored is not None and anchored.seq < found:
        return VerifyResult(
            False, checked, anchored.seq + 1, "entries after the anchored head were not anchored"
        )
    if expected is not None and expected.seq > found:
        return VerifyResult(
            False, checked, found + 1,
            f"the log ends at entry {found} but the expected head is {expected.seq}",
        )
    return VerifyResult(True, checked, None, "", last)
