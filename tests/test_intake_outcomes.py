"""Every message ends as readings, a counted ``ignored`` outcome or a dead letter; device
clocks are bounded; unconfigured devices are limited; the ledger is whole mWh."""

from __future__ import annotations

import json
import resource
import time
import tomllib
from pathlib import Path

from monitor import config
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.store.ledger import Store

BASE = """
[site]
id = "s"
category = "individual"
timezone = "Asia/Irkutsk"
[[sources]]
topic = "meters/#"
format = "json"
[[sources]]
topic = "tele/+/+"
format = "tasmota"
"""


def make(tmp_path: Path, extra: str = "") -> tuple[Intake, Store]:
    c = config.parse(tomllib.loads(BASE + extra))
    st = Store(tmp_path / "m.db")
    return Intake(c, st, Metrics()), st


def native(meter: str, **fields: object) -> bytes:
    return json.dumps({"meter": meter, **fields}).encode()


def test_ignored_messages_are_counted_by_reason_in_the_store(tmp_path: Path) -> None:
    intake, st = make(tmp_path)
    now = time.time()
    rep = intake.handle([Message("tele/pow1/STATE", b'{"POWER":"ON"}', now),
                         Message("tele/pow1/STATE", b'{"POWER":"OFF"}', now)])
    assert rep.ignored == 2 and rep.readings == 0 and rep.dead_letters == 0
    got = st.outcomes()["ignored"]
    assert sum(got.values()) == 2 and all(got.values())
    st.close()


def test_a_device_time_in_microseconds_neither_stops_intake_nor_grows_memory(
        tmp_path: Path) -> None:
    intake, st = make(tmp_path)
    now = time.time()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    intake.handle([
        Message("meters/a", native("a", ts=now - 20, energy_kwh=1.0), now),
        Message("meters/a", native("a", ts=now * 1_000_000, energy_kwh=1.01), now + 1),
        Message("meters/a", native("a", ts=now + 5, energy_kwh=1.02), now + 5),
    ])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50
    kinds = [k for (k,) in st.conn.execute("SELECT kind FROM anomalies")]
    assert "clock_ahead" in kinds
    # both increments are counted, each once, in the buckets of the receipt times
    (mwh,) = st.conn.execute("SELECT sum(mwh) FROM ledger").fetchone()
    assert mwh == 20_000
    (buckets,) = st.conn.execute("SELECT count(*) FROM ledger").fetchone()
    assert buckets <= 2
    st.close()


def test_a_clock_two_days_fast_does_not_book_future_days_or_hide_later_readings(
        tmp_path: Path) -> None:
    intake, st = make(tmp_path)
    now = time.time()
    intake.handle([Message("meters/b", native("b", ts=now, energy_kwh=5.0), now)])
    intake.handle([Message("meters/b", native("b", ts=now + 2 * 86400 + 10, energy_kwh=5.1),
                           now + 10)])
    intake.handle([Message("meters/b", native("b", ts=now + 20, energy_kwh=5.2), now + 20)])
    (mwh,) = st.conn.execute("SELECT sum(mwh) FROM ledger").fetchone()
    assert mwh == 200_000  # the correct reading after the fast one was not out of order
    (last,) = st.conn.execute("SELECT max(bucket) FROM ledger").fetchone()
    assert last <= now + 900
    st.close()


def test_unconfigured_devices_are_limited_and_can_be_refused(tmp_path: Path) -> None:
    intake, st = make(tmp_path, "[intake]\nmax_unconfigured_meters = 2\n")
    now = time.time()
    rep = intake.handle([Message(f"meters/m{i}", native(f"m{i}", power_w=10.0), now)
                         for i in range(3)])
    assert rep.readings == 2 and rep.dead_letters == 1
    assert [r for (r,) in st.conn.execute("SELECT reason FROM dead_letters")] == [
        "too_many_meters"]
    st.close()

    strict, st2 = make(tmp_path / "b", """
[intake]
allow_unconfigured = false
[[meters]]
id = "rig-1"
device = "known"
""")
    rep = strict.handle([Message("meters/known", native("known", power_w=1.0), now),
                         Message("meters/other", native("other", power_w=1.0), now)])
    assert rep.readings == 1 and rep.dead_letters == 1
    assert [r for (r,) in st2.conn.execute("SELECT reason FROM dead_letters")] == [
        "unconfigured_device"]
    st2.close()


def test_check_status_and_report_sum_the_same_integers(tmp_path: Path) -> None:
    # thousands of tiny increments over many meters: exact at rest, whatever the order
    intake, st = make(tmp_path)
    t0 = time.time() - 3000
    msgs = []
    for k in range(200):
        for m in range(7):
            msgs.append(Message(f"meters/x{m}",
                                native(f"x{m}", ts=t0 + k * 10, energy_kwh=1 + k * 0.0001237),
                                t0 + k * 10 + 0.5))
    intake.handle(msgs)
    (ledger,) = st.conn.execute("SELECT sum(mwh) FROM ledger").fetchone()
    (daily,) = st.conn.execute("SELECT sum(mwh) FROM daily").fetchone()
    (monthly,) = st.conn.execute("SELECT sum(mwh) FROM monthly").fetchone()
    assert isinstance(ledger, int) and ledger == daily == monthly
    assert ledger == 7 * round(199 * 0.0001237 * 1e6)
    st.close()
