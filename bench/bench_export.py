"""Export throughput: readings per second from a filled SQLite store into a real
VictoriaMetrics (Debian's ``victoria-metrics``) through the real exporter.

``run(tmpdir)`` fills a store with ``n_readings`` readings of ``n_meters``
meters, starts VictoriaMetrics on a free loopback port, flushes until the
backlog is empty, checks that every reading arrived exactly once, stops the
server and returns the numbers.  Also runnable directly:
``python bench/bench_export.py [N]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, or imported by a harness in bench/
    sys.path.insert(0, str(ROOT))

from monitor.config import InfluxConfig  # noqa: E402
from monitor.outputs.exporter import Exporter  # noqa: E402
from tests.tsdb import Row, add_meter, add_readings, open_store, victoria_metrics  # noqa: E402

T0 = 1_790_000_000.0


def fill(db: Path, n_readings: int, n_meters: int) -> None:
    """``n_readings`` readings, round-robin over ``n_meters`` meters every 10 s."""
    conn = open_store(db)
    try:
        for m in range(n_meters):
            add_meter(conn, f"rack-{m:04d}", f"hall-{m % 8}", "tasmota")
        rows: list[Row] = []
        for k in range(n_readings):
            i, m = divmod(k, n_meters)
            rows.append((f"rack-{m:04d}", T0 + i * 10.0 + m * 0.001, 3000.0 + (i % 97),
                         10_000.0 + i * 0.0083, 0.0083, 229.0 + (i % 5) / 10, 13.1))
            if len(rows) == 50_000:
                add_readings(conn, rows)
                rows = []
        add_readings(conn, rows)
    finally:
        conn.close()


def run(tmpdir: Path | str, n_readings: int = 200_000, n_meters: int = 200,
        batch_size: int = 5000) -> dict[str, Any]:
    tmp = Path(tmpdir)
    db = tmp / "bench-export.db"
    fill(db, n_readings, n_meters)

    with victoria_metrics(tmp / "vm") as vm:
        config = InfluxConfig(url=vm.url, org="bench", bucket="energy", batch_size=batch_size,
                              timeout_s=30.0, max_backlog_rows=max(1000, n_readings * 2))
        exporter = Exporter(config, "bench-site", db)
        requests = batches = 0
        started = time.perf_counter()
        while True:
            result = exporter.flush(max_batches=100)
            if result.error:
                raise RuntimeError(f"export failed: {result.error}")
            requests += result.requests
            batches += result.batches
            if not result.more:
                break
        seconds = time.perf_counter() - started
        backlog = exporter.backlog()
        exporter.close()

        series = vm.export('{__name__="energy_reading_energy_delta_kwh"}')
        samples = sum(len(s.timestamps_ms) for s in series)
        duplicates = sum(c - 1 for s in series for c in Counter(s.timestamps_ms).values()
                         if c > 1)

    return {
        "name": "export_to_victoria_metrics",
        "readings": n_readings,
        "meters": n_meters,
        "batch_size": batch_size,
        "fields_per_reading": 5,
        "seconds": round(seconds, 3),
        "readings_per_s": round(n_readings / seconds, 1) if seconds > 0 else None,
        "requests": requests,
        "batches": batches,
        "backlog_after": backlog.rows,
        "samples_in_vm": samples,
        "duplicates_in_vm": duplicates,
        "exactly_once": samples == n_readings and duplicates == 0 and backlog.rows == 0,
    }


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(d, n_readings=count), indent=2))
