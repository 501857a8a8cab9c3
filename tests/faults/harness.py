"""What every fault test does: a real daemon on a real broker, fed by the simulator,
checked against the simulator's ground truth.

* :class:`Site` writes a daemon config for a fleet (HTTP on a free port), starts and
  kills the daemon (optionally under libfaketime), reads ``/healthz`` and ``/metrics``;
* :class:`SimRun` runs :func:`sim.simulate.simulate` in a thread, so the test can
  inject its fault while readings flow;
* :func:`assert_ledger_matches` waits for the ledger to reach the truth and then
  checks, per meter, that it stays there: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sim import simulate
from tests.daemon import ROOT, STARTED, Daemon, query, wait_for, write_config
from tests.servers import free_port

#: the ledger per meter must match the simulator's observable energy this closely: the
#: daemon books whole mWh, the simulator sums device-resolution counter steps
LEDGER_ABS_KWH = 1e-5


class FaultDaemon(Daemon):
    """The real daemon, with extra environment (``LD_PRELOAD`` of libfaketime)."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(config, log)
        self.extra_env = env or {}

    def start(self) -> FaultDaemon:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.extra_env}
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "monitor", "run", "--config", str(self.config)],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        STARTED.append(self)
        return self


class Site:
    """One daemon for one simulated fleet on one broker (see module docstring)."""

    def __init__(self, tmp: Path, broker_port: int, body: str, *, site: str = "flt",
                 tz: str = "UTC", env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.tmp = tmp
        self.broker_port = broker_port
        self.http_port = free_port()
        cfg = write_config(tmp / "daemon.toml", broker_port, body, site=site, tz=tz, http=True)
        text = cfg.read_text().replace('listen = "127.0.0.1:0"',
                                       f'listen = "127.0.0.1:{self.http_port}"')
        cfg.write_text(text)
        self.config = cfg
        self.log = log or tmp / "daemon.log"
        self.daemon = FaultDaemon(cfg, self.log, env)

    # -------------------------------------------------------------- lifecycle
    def start(self, wait: bool = True) -> Site:
        self.daemon.start()
        if wait:
            wait_for(lambda: self.http("/healthz")[0] in (200, 503), 60, what="daemon HTTP up")
            # subscribed: the persistent session exists on the broker from now on
            wait_for(lambda: self.metric("energy_monitor_mqtt_connected") == 1.0, 60,
                     what="daemon connected to the broker")
            time.sleep(0.5)
        return self

    def kill(self) -> None:
        self.daemon.kill()

    def stop(self) -> int:
        return self.daemon.stop()

    # -------------------------------------------------------------- HTTP
    def http(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
        except OSError:
            return 0, b""

    def health(self) -> tuple[int, list[str]]:
        code, body = self.http("/healthz")
        return code, list(json.loads(body or b"[]")) if code else []

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{'name{labels}': value}`` (empty while the daemon is down)."""
        code, body = self.http("/metrics")
        out: dict[str, float] = {}
        if code != 200:
            return out
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of a metric's samples whose labels include ``labels``."""
        total: float | None = None
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
            if all(have.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + value
        return total

    # -------------------------------------------------------------- the store
    def q(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return query(self.config, sql, params)

    def ledger_kwh(self) -> dict[str, float]:
        return {str(m): float(k) for m, k in
                self.q("SELECT meter, sum(mwh) / 1e6 FROM ledger GROUP BY meter")}

    def count(self, table: str) -> int:
        rows = self.q(f"SELECT count(*) FROM {table}")
        return int(rows[0][0]) if rows else 0


def fleet_body(fleet: simulate.Fleet, extra: str = "") -> str:
    """``[[sources]]``/``[[meters]]`` for ``fleet``, for a time-compressed run: the
    plausibility bound (power x elapsed receipt time) is off, as in test_e2e_ingest."""
    return (simulate.config_snippet(fleet, rated_kw=False)
            + "\n[intake]\nunrated_max_kw = 1e12\n" + extra)


class SimRun:
    """:func:`sim.simulate.simulate` in a thread: ``start()``, inject faults, ``join()``."""

    def __init__(self, fleet: simulate.Fleet, options: simulate.SimOptions, port: int,
                 **kw: Any) -> None:
        self.fleet, self.options, self.port, self.kw = fleet, options, port, kw
        self.truth: simulate.Truth | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def _run(self) -> None:
        try:
            self.truth = simulate.simulate(self.fleet, self.options, port=self.port,
                                           stop=self.stop, **self.kw)
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def start(self) -> SimRun:
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float = 600) -> simulate.Truth:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "simulator did not finish"
        if self.error is not None:
            raise self.error
        assert self.truth is not None
        assert self.truth.unacked == 0, "the broker did not take every reading"
        return self.truth


def options(readings_per_meter: int, interval_s: float, *, seed: int = 1, speed: float = 0,
            reboot_prob: float = 0.0, dup_prob: float = 0.0, garbage_prob: float = 0.0,
            gap_prob: float = 0.0) -> simulate.SimOptions:
    """As fast as possible (``speed`` 0) or ``speed`` simulated seconds per second,
    ending about now (device clocks are bounded by the daemon)."""
    duration = readings_per_meter * interval_s - interval_s / 2
    ahead = duration / speed if speed else 0.0  # real seconds the run takes
    return simulate.SimOptions(duration_s=duration, speed=speed,
                               start=time.time() - duration + ahead - 60, seed=seed,
                               obey_commands=False, reboot_prob=reboot_prob,
                               dup_prob=dup_prob, garbage_prob=garbage_prob, gap_prob=gap_prob)


def assert_ledger_matches(site: Site, truth: simulate.Truth, timeout_s: float = 240) -> None:
    """Wait until every meter's ledger equals its observable energy, then check it
    stays equal (a late redelivery counted twice would show now)."""
    want = {mid: mt.observable_kwh for mid, mt in truth.meters.items()}

    def matches() -> bool:
        got = site.ledger_kwh()
        return all(abs(got.get(m, 0.0) - w) <= LEDGER_ABS_KWH for m, w in want.items())

    # on a timeout, the comparison below says which meters differ, and by how much
    with contextlib.suppress(AssertionError):
        wait_for(matches, timeout_s, interval_s=1.0, what="ledger equal to the ground truth")
    time.sleep(3.0)
    got = site.ledger_kwh()
    wrong = {m: (got.get(m, 0.0), w) for m, w in want.items()
             if abs(got.get(m, 0.0) - w) > LEDGER_ABS_KWH}
    assert not wrong, f"ledger (got, truth) kWh differs for {len(wrong)} meters: " \
                      f"{dict(list(wrong.items())[:8])}"
    extra = set(got) - set(want) - {"zz-marker"}
    assert not extra, f"meters the simulator never published: {sorted(extra)}"
    assert sum(got[m] for m in want) == pytest.approx(sum(want.values()), abs=1e-4)
