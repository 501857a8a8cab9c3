"""Live latency: publish -> committed at a steady rate from many meters.

A publisher sends native-JSON counter readings, QoS 1, round-robin over
``meters`` meters at ``rate`` readings/s for ``seconds`` to a running daemon
(the repository's default configuration).  It notes the wall time at which it
handed each reading to paho.  A poller reads new rows of ``readings`` every
``poll_s`` and notes when each one became visible; rows are matched to what was
published by (meter, ts).  Latency = visible - published, so it includes the
poll interval (at most ``poll_s``, on average half of it).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.bench_drain import KWH_PER_STEP, TOPIC, _broker, _peak_rss_kib
from tests.daemon import Daemon, query, wait_for, write_config


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def run(workdir: Path, meters: int = 10_000, rate: int = 2_000, seconds: float = 180.0,
        poll_s: float = 0.01) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    broker = _broker(workdir)
    published: dict[tuple[str, float], float] = {}
    seen: dict[tuple[str, float], float] = {}
    try:
        cfg = write_config(workdir / "daemon.toml", broker.port,
                           '[[sources]]\ntopic = "bench/#"\nformat = "json"\n')
        d = Daemon(cfg, workdir / "daemon.log").start()
        wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30, what="daemon up")
        time.sleep(1.5)  # subscribed
        db = sqlite3.connect(f"file:{workdir / 'monitor.db'}?mode=ro", uri=True,
                             check_same_thread=False)
        stop = threading.Event()

        def poll() -> None:
            last = 0
            while not stop.is_set():
                rows = db.execute("SELECT id, meter, ts FROM readings WHERE id > ?",
                                  (last,)).fetchall()
                now = time.time()
                for rid, meter, ts in rows:
                    seen.setdefault((meter, ts), now)
                    last = max(last, rid)
                time.sleep(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-live",
                          protocol=paho.MQTTv5)
        pub.max_inflight_messages_set(0)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        n = int(rate * seconds)
        start_ts = float(int(time.time()) - (n // meters + 1) * 10 - 600)
        t0 = time.monotonic()
        infos = []
        for i in range(n):
            m, k = i % meters, i // meters
            ts = start_ts + k * 10.0
            meter = f"m{m:05d}"
            body = json.dumps({"meter": meter, "ts": ts, "power_w": 3000.0,
                               "energy_kwh": round(k * KWH_PER_STEP, 6)})
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            published[(meter, ts)] = time.time()
            infos.append(pub.publish(TOPIC.format(m), body, qos=1))
            if len(infos) >= 10_000:
                infos = [x for x in infos if not x.is_published()]
        sent_s = time.monotonic() - t0
        for x in infos:
            x.wait_for_publish(60)
        pub.disconnect()
        pub.loop_stop()
        wait_for(lambda: len(seen) >= n, 120, 0.1, "all committed")
        stop.set()
        poller.join(10)
        db.close()
        assert d.proc is not None
        rss = _peak_rss_kib(d.proc.pid)
        d.stop()
    finally:
        broker.stop()
    lat = [(seen[k] - t) * 1000 for k, t in published.items() if k in seen]
    # the first 10 s are left out: the meters' first readings are baselines and the
    # daemon learns 10,000 new meters (one-off start-up, not the steady state)
    skip = min(len(lat) // 2, rate * 10)
    steady = lat[skip:]
    return {"meters": meters, "rate_per_s": rate, "seconds": seconds,
            "publish_s": round(sent_s, 1), "readings": len(lat), "poll_s": poll_s,
            "steady_readings": len(steady),
            "p50_ms": round(_pct(steady, 50), 1), "p95_ms": round(_pct(steady, 95), 1),
            "p99_ms": round(_pct(steady, 99), 1), "max_ms": round(max(steady), 1),
            "mean_ms": round(statistics.fmean(steady), 1),
            "p99_ms_incl_first_10s": round(_pct(lat, 99), 1),
            "daemon_peak_rss_mib": round(rss / 1024, 1)}
