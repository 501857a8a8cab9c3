"""Drain benchmark: 200,000 QoS 1 readings queued by the broker for a stopped client,
drained by the daemon and by a bare paho client that only counts, in the same run.

Both sessions are persistent subscriptions to ``bench/#`` on the same private
mosquitto, so the broker queues the same messages for both; they are drained
one after the other (never at the same time), in three rounds that alternate
which one goes first, and the medians are reported.  Each drain is timed from its
MQTT connection to its last message: for the bare client from ``connect()`` to
the n-th ``on_message``, for the daemon from its retained ``online`` status
(published in its ``on_connect``) to the n-th reading committed in SQLite.
Python start-up and migrations of the daemon are reported apart
(``daemon_startup_s``), since the bare client has none.

Also: peak RSS (``VmHWM``) of the daemon after it has seen 10,000 distinct meters.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemon import Daemon, query, wait_for, write_config
from tests.servers import Mosquitto

TOPIC = "bench/{}"
SITE = "test-site"  # write_config's default site id: status on energy-monitor/test-site/status
KWH_PER_STEP = 3000 * 10 / 3.6e6  # 3 kW for 10 s


def _broker(workdir: Path) -> Mosquitto:
    """A private mosquitto as the tests start it, except that it saves its persistence
    file only every 1800 s (mosquitto's default) instead of every second: with up to
    400,000 messages queued, a save per second would measure the broker's disk writes
    rather than the clients.  No benchmark restarts the broker, so nothing is lost."""
    broker = Mosquitto(workdir / "broker", max_queued=0)
    conf = re.sub(r"(?m)^autosave_interval .*$", "autosave_interval 1800",
                  broker.conf.read_text())
    if "autosave_interval 1800" not in conf:
        raise RuntimeError(f"unexpected mosquitto config from tests.servers: {broker.conf}")
    broker.conf.write_text(conf)
    return broker.start()


def _session_client(port: int, client_id: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    return c


def _register_bare(port: int) -> None:
    c = _session_client(port, "bare-counter")
    c.loop_start()
    c.subscribe("bench/#", qos=1)
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()


def recent_start(rounds: int, steps: int) -> float:
    """A start time whose last reading is an hour ago: the daemon's housekeeping (at start,
    then hourly) deletes readings older than ``raw_retention_days``, so fixed old
    timestamps would vanish from the table this benchmark counts."""
    return float(int(time.time()) - rounds * steps * 10 - 3600)


def publish(port: int, n: int, meters: int, start_ts: float | None = None,
            first_step: int = 0) -> float:
    """Publish ``n`` native-JSON counter readings round-robin over ``meters``; returns seconds.

    Every meter reads 3 kW every 10 s from ``start_ts`` (default: see
    :func:`recent_start`); its counter and clock continue from step ``first_step``,
    so a later round goes on where the previous one stopped.
    """
    if start_ts is None:
        start_ts = recent_start(1, -(-n // meters))
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=paho.MQTTv5)
    # No paho in-flight limit: with one, paho walks every outgoing message on each
    # PUBACK to find the next queued one (quadratic; 200k took ~90 s instead of ~10 s).
    # The chunks below bound what is unacknowledged instead.
    pub.max_inflight_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    t0 = time.perf_counter()
    pending: list[paho.MQTTMessageInfo] = []
    for i in range(n):
        m = i % meters
        k = first_step + i // meters
        payload = json.dumps({"meter": f"m{m:05d}", "ts": start_ts + k * 10.0,
                              "power_w": 3000.0, "energy_kwh": round(k * KWH_PER_STEP, 6)})
        pending.append(pub.publish(TOPIC.format(m), payload, qos=1))
        if len(pending) >= 15000:  # stay well below the 65,535 message-id space
            for info in pending:
                info.wait_for_publish(60)
            pending.clear()
    for info in pending:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - t0
    pub.disconnect()
    pub.loop_stop()
    return elapsed


def drain_bare(port: int, n: int) -> float:
    """Seconds for the bare client to take ``n`` new messages (paho acknowledges each)."""
    got = 0
    done = threading.Event()

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        nonlocal got
        if m.dup:  # a re-send of the previous round's last message, if its PUBACK was lost
            return
        got += 1
        if got >= n:
            done.set()

    t0 = time.perf_counter()
    c = _session_client(port, "bare-counter")
    c.on_message = on_message
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"bare client got only {got} of {n}")
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


def _cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used (``/proc/PID/stat`` utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _committed(cfg: Path) -> int:
    """Readings committed so far: ``max(id)`` is O(1) where ``count(*)`` scans the table,
    and the table only grows here (no retention runs during a benchmark)."""
    rows = query(cfg, "SELECT max(id) FROM readings")
    return int(rows[0][0] or 0) if rows else 0


class _OnlineWatch:
    """Notes when the daemon's retained status turns ``online`` (its ``on_connect``)."""

    def __init__(self, port: int, site: str = SITE) -> None:
        self.at: float | None = None
        self.seen = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-watch",
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"energy-monitor/{site}/status", qos=0)
        self.client.loop_start()

    def _on_message(self, c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        if m.payload == b"online" and not m.retain and self.at is None:
            self.at = time.perf_counter()
            self.seen.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class _DaemonDrain:
    seconds: float  # online status -> last reading committed
    startup_s: float  # process start -> online status
    peak_rss_kib: int
    cpu_s: float  # the daemon process's whole life: start-up and drain


def drain_daemon(d: Daemon, cfg: Path, port: int, committed: int) -> _DaemonDrain:
    """Start the stopped daemon and time it until ``committed`` readings are in SQLite."""
    watch = _OnlineWatch(port)
    try:
        t0 = time.perf_counter()
        d.start()
        wait_for(lambda: _committed(cfg) >= committed, 900, 0.05, "daemon drained")
        t_done = time.perf_counter()
        if not watch.seen.wait(10) or watch.at is None:
            raise RuntimeError("the daemon never published its online status")
        assert d.proc is not None
        rss = _peak_rss_kib(d.proc.pid)
        cpu = _cpu_s(d.proc.pid)
    finally:
        watch.close()
        if d.alive():
            d.stop()
    return _DaemonDrain(t_done - watch.at, watch.at - t0, rss, cpu)


def run(workdir: Path, n: int = 200_000, meters: int = 100, rounds: int = 3,
        rss_meters: int = 10_000) -> dict[str, Any]:
    """``rounds`` times: publish ``n`` readings of ``meters`` meters while both clients are
    away, then drain them with each (bare first in even rounds, daemon first in odd ones,
    so neither always meets the fuller broker).  Medians over the rounds; the ratio is the
    median of the per-round ratios.  Then :func:`rss_10k` with ``rss_meters`` meters.
    Raises if a drain is incomplete or the daemon's ledger is off."""
    workdir.mkdir(parents=True, exist_ok=True)
    steps = n // meters  # readings per meter and round
    start_ts = recent_start(rounds, steps)
    per_round: list[dict[str, Any]] = []
    broker = _broker(workdir)
    try:
        # the repository's default configuration: only the broker, store and source
        cfg = write_config(workdir / "daemon.toml", broker.port, """
[[sources]]
topic = "bench/#"
format = "json"
""")
        d = Daemon(cfg, workdir / "daemon.log").start()
        wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30, what="daemon up")
        time.sleep(1.0)  # subscribed with a persistent session
        d.stop()
        _register_bare(broker.port)
        for r in range(rounds):
            pub_s = publish(broker.port, n, meters, start_ts, first_step=r * steps)
            order = ("bare", "daemon") if r % 2 == 0 else ("daemon", "bare")
            assert broker.proc is not None
            for who in order:
                # CPU of the bare client: this process, idle but for paho's thread
                cpu0, broker0 = _cpu_s(), _cpu_s(broker.proc.pid)
                if who == "bare":
                    bare_s = drain_bare(broker.port, n)
                    bare_cpu = _cpu_s() - cpu0
                    broker_bare = _cpu_s(broker.proc.pid) - broker0
                else:
                    dd = drain_daemon(d, cfg, broker.port, (r + 1) * n)
                    broker_daemon = _cpu_s(broker.proc.pid) - broker0
            per_round.append({
                "first": order[0], "publish_s": round(pub_s, 3), "bare_paho_s": round(bare_s, 3),
                "daemon_s": round(dd.seconds, 3), "daemon_startup_s": round(dd.startup_s, 3),
                "ratio": round(bare_s / dd.seconds, 3),
                "ratio_with_startup": round(bare_s / (dd.seconds + dd.startup_s), 3),
                "daemon_peak_rss_mib": round(dd.peak_rss_kib / 1024, 1),
                "bare_paho_cpu_s": round(bare_cpu, 2), "daemon_cpu_s": round(dd.cpu_s, 2),
                "broker_cpu_s_bare": round(broker_bare, 2),
                "broker_cpu_s_daemon": round(broker_daemon, 2)})
        rows = query(cfg, "SELECT count(*), sum(delta_kwh) FROM readings")[0]
    finally:
        broker.stop()
    total = rounds * n
    db_bytes = sum(f.stat().st_size for f in workdir.glob("monitor.db*"))
    expected_kwh = meters * (rounds * steps - 1) * KWH_PER_STEP  # a meter's first has no delta
    if rows[0] != total or abs((rows[1] or 0.0) - expected_kwh) > 1e-6 * expected_kwh + 1e-3:
        raise RuntimeError(f"daemon committed {rows[0]} readings / {rows[1]} kWh, "
                           f"expected {total} / {expected_kwh:.3f}")

    def med(key: str) -> float:
        return float(statistics.median(float(x[key]) for x in per_round))

    bare_s, daemon_s = med("bare_paho_s"), med("daemon_s")
    result: dict[str, Any] = {
        "messages": n,
        "meters": meters,
        "rounds": rounds,
        "batch_size": "default",
        "bare_paho_s": round(bare_s, 3),
        "bare_paho_msgs_per_s": round(n / bare_s),
        "daemon_s": round(daemon_s, 3),
        "daemon_msgs_per_s": round(n / daemon_s),
        "daemon_startup_s": round(med("daemon_startup_s"), 3),
        "daemon_vs_bare_ratio": round(med("ratio"), 3),
        "daemon_vs_bare_ratio_with_startup": round(med("ratio_with_startup"), 3),
        "target_ratio": 0.5,
        "readings_committed": rows[0],
        "kwh_committed": round(rows[1], 3),
        "kwh_expected": round(expected_kwh, 3),
        "daemon_peak_rss_mib": max(x["daemon_peak_rss_mib"] for x in per_round),
        "db_mib": round(db_bytes / 2**20, 1),
        "db_bytes_per_reading": round(db_bytes / total),
        # CPU per message: less disturbed by other tenants of the machine than wall time;
        # the daemon's includes its start-up, so it is slightly pessimistic
        "bare_paho_cpu_us_per_msg": round(med("bare_paho_cpu_s") / n * 1e6, 1),
        "daemon_cpu_us_per_msg": round(med("daemon_cpu_s") / n * 1e6, 1),
        "broker_cpu_us_per_msg_bare": round(med("broker_cpu_s_bare") / n * 1e6, 1),
        "broker_cpu_us_per_msg_daemon": round(med("broker_cpu_s_daemon") / n * 1e6, 1),
        "per_round": per_round,
    }
    if rss_meters:
        result["rss_10k_meters"] = rss_10k(workdir / "rss", meters=rss_meters)
    return result


def curve(workdir: Path, n: int = 200_000, meters: tuple[int, ...] = (100, 1_000, 10_000),
          rounds: int = 3, rss_meters: int = 10_000) -> dict[str, Any]:
    """:func:`run` at each meter count (a fresh broker and store each), then the RSS."""
    points = [run(workdir / f"m{m}", n=n, meters=m, rounds=rounds, rss_meters=0)
              for m in meters]
    return {"messages": n, "rounds": rounds, "points": points,
            "rss_10k_meters": rss_10k(workdir / "rss", meters=rss_meters)}


def rss_10k(workdir: Path, meters: int = 10_000, per_meter: int = 5) -> dict[str, Any]:
    """Peak RSS of a daemon that took ``per_meter`` live readings from each of ``meters``."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker = _broker(workdir)
    n = meters * per_meter
    try:
        cfg = write_config(workdir / "daemon.toml", broker.port,
                           '[[sources]]\ntopic = "bench/#"\nformat = "json"\n')
        d = Daemon(cfg, workdir / "daemon.log").start()
        wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30, what="daemon up")
        time.sleep(1.0)
        assert d.proc is not None
        idle = _peak_rss_kib(d.proc.pid)
        publish(broker.port, n, meters)
        wait_for(lambda: _committed(cfg) >= n, 600, 0.1, "daemon drained")
        rss = _peak_rss_kib(d.proc.pid)
        known = query(cfg, "SELECT count(*) FROM meters")[0][0]
        d.stop()
    finally:
        broker.stop()
    if known != meters:
        raise RuntimeError(f"daemon knows {known} meters, expected {meters}")
    return {"meters": meters, "readings": n, "idle_peak_rss_mib": round(idle / 1024, 1),
            "peak_rss_mib": round(rss / 1024, 1)}
