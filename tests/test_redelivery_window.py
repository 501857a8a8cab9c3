"""How far back a re-delivered message is recognised (monitor.store.ledger.seen).

A broker that keeps to Receive Maximum re-delivers at most that many messages after a
reconnect.  mosquitto before 2.0.13 (Debian 12's 2.0.11) does not, when it drains a
backlog: it can re-send, with the DUP flag, tens of thousands of messages whose PUBACK
it had not read yet, with packet ids that have wrapped around.  Each must be
recognised by its (packet id, topic, payload) fingerprint, not counted again.
"""

from __future__ import annotations

from pathlib import Path

from monitor.intake.worker import fingerprint
from monitor.store.ledger import FINGERPRINTS_KEPT, IntakeBatch, Store


def _commit(store: Store, first: int, count: int) -> None:
    """Commit the fingerprints of messages ``first ..`` with packet ids as a broker
    hands them out: 1 to 65535, then round again."""
    for start in range(first, first + count, 20_000):
        b = IntakeBatch()
        for k in range(start, min(start + 20_000, first + count)):
            mid = k % 65_535 + 1
            b.fingerprints.append((mid, fingerprint("site/m", f"{k}".encode(), mid)))
        store.commit_batch(b)


def _fp(k: int) -> tuple[int, bytes]:
    mid = k % 65_535 + 1
    return mid, fingerprint("site/m", f"{k}".encode(), mid)


def test_a_redelivery_is_recognised_across_several_rounds_of_packet_ids(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    try:
        sent = 200_000  # three rounds of packet ids
        _commit(store, 0, sent)
        # the first message, and later ones with the same packet id: all committed
        same_id = [_fp(k) for k in (0, 65_535, 131_070, 196_605)]
        assert len({mid for mid, _ in same_id}) == 1
        assert store.seen(same_id) == {fp for _, fp in same_id}
        # a message never committed, with a packet id in use: not taken for one that was
        mid = same_id[0][0]
        assert store.seen([(mid, fingerprint("site/m", b"new", mid))]) == set()
        # the same bytes under another packet id are another message (devices repeat)
        assert store.seen([(mid + 1, fingerprint("site/m", b"0", mid + 1))]) == set()
    finally:
        store.close()


def test_the_window_is_the_last_fingerprints_kept_and_older_rows_still_count(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    try:
        # a row written before migration 11 has no packet id (0): still compared
        legacy = fingerprint("site/m", b"legacy", 9)
        with store.transaction() as c:
            c.execute("INSERT INTO msg_seen (fp) VALUES (?)", (legacy,))
        assert store.seen([(9, legacy)]) == {legacy}
        _commit(store, 0, FINGERPRINTS_KEPT + 1_000)
        assert store.seen([(9, legacy)]) == set()  # trimmed with the oldest
        # the legacy row and messages 0..999 are the 1,001 oldest: gone; 1,000 is kept
        assert store.seen([_fp(0), _fp(999)]) == set()
        assert store.seen([_fp(1_000)]) == {_fp(1_000)[1]}
        assert store.seen([_fp(FINGERPRINTS_KEPT + 999)]) == {_fp(FINGERPRINTS_KEPT + 999)[1]}
        n = store.conn.execute("SELECT count(*) FROM msg_seen").fetchone()[0]
        assert n == FINGERPRINTS_KEPT
    finally:
        store.close()
