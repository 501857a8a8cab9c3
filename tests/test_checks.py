"""The check job's snapshot builder over a real SQLite store."""

from __future__ import annotations

import tomllib
from pathlib import Path

from monitor import config, rules
from monitor.checks import build_snapshot
from monitor.store import Store

CFG = """
[site]
id = "s"
category = "individual"
[[sources]]
topic = "x/#"
format = "json"
[[meters]]
id = "never"
device = "never"
[[rules]]
id = "silent"
kind = "stale_data"
max_silence_s = 60
"""


def test_a_meter_that_never_reported_is_stale_only_after_max_silence_since_start(
        tmp_path: Path) -> None:
    c = config.parse(tomllib.loads(CFG))
    st = Store(tmp_path / "m.db")
    st.register_meters([("never", "never", "")])
    now = 1_790_000_000.0
    fresh = rules.evaluate_all(c.rules, build_snapshot(st, c, now, watching_since=now - 10))
    assert [v.state for v in fresh] == ["ok"]
    # silence must exceed both max_silence_s and the meter's expected interval (300 s)
    later = rules.evaluate_all(c.rules, build_snapshot(st, c, now, watching_since=now - 400))
    assert [v.state for v in later] == ["warning"]
    st.close()
