"""The intake worker in process: parse, account and commit one batch to a real store."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from monitor import config
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.store.ledger import Store

CFG = """
[site]
id = "s"
category = "individual"
timezone = "Asia/Irkutsk"
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"
"""


def test_untrusted_device_clock_is_replaced_by_receipt_time_and_kept(tmp_path: Path) -> None:
    # a Tasmota that never synced its clock says 1970, without an offset
    c = config.parse(tomllib.loads(CFG))
    st = Store(tmp_path / "m.db")
    intake = Intake(c, st, Metrics())
    received = 1_790_000_000.0
    body = {"Time": "1970-01-01T00:05:00", "ENERGY": {"Total": 1.5, "Power": 100}}
    intake.handle([Message("tele/pow1/SENSOR", json.dumps(body).encode(), received)])
    ((ts, device_ts),) = st.conn.execute("SELECT ts, device_ts FROM readings").fetchall()
    assert ts == received
    assert device_ts == 300.0  # 00:05 on 1970-01-01, read as UTC
    st.close()
