"""The store's file system full (a small tmpfs filled with ballast) while readings stream.

Intake must stop acknowledging, so the broker keeps the readings; ``/healthz`` turns
503; an alert is raised; when space returns everything is accounted exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim import simulate
from tests.daemon import wait_for
from tests.faults.harness import SimRun, Site, assert_ledger_matches, fleet_body, options
from tests.servers import Mosquitto
from tests.test_e2e_actions import Receiver

SECRET = "fault-suite-secret"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, unmounted (lazily, whatever is open) at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file until the file system says ENOSPC."""
    ballast = directory / "ballast"
    chunk = b"\0" * (1 << 20)
    with ballast.open("wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        for size in (65536, 4096, 512, 1):  # the last bytes, too
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * size)
    return ballast


def _disk_full(broker: Mosquitto, tmp_path: Path, fs: Path, per_meter: int, speed: float,
               full_s: float) -> None:
    fleet = simulate.Fleet.build(8, simulate.FORMATS, site="flt", seed=41, interval_s=10)
    opts = options(per_meter, 10, seed=41, speed=speed, garbage_prob=0.005, dup_prob=0.01)
    receiver = Receiver(SECRET).open()
    (tmp_path / "hook.secret").write_text(SECRET)
    site = Site(fs, broker.port, fleet_body(fleet, f"""
[schedule]
check_interval_s = 1

[[webhooks]]
url = "{receiver.url}"
secret_file = "{tmp_path / 'hook.secret'}"
"""), log=tmp_path / "daemon.log")
    try:
        site.start()
        sim = SimRun(fleet, opts, broker.port).start()
        wait_for(lambda: site.count("readings") > 200, 60, what="readings flowing")
        ballast = fill(fs)
        wait_for(lambda: site.health()[0] == 503 and any(
            r.startswith("store:") for r in site.health()[1]), 60,
                 what="/healthz 503 naming the store")
        assert site.metric("energy_monitor_store_writable") == 0.0
        held = site.count("readings")
        t0 = time.monotonic()
        while time.monotonic() - t0 < full_s:
            time.sleep(1)
            assert site.daemon.alive(), "the daemon died on a full disk"
        assert site.count("readings") == held, "nothing committed while the disk is full"
        errors = site.metric("energy_monitor_store_errors_total")
        assert errors is not None and errors > 0
        truth = sim.join()  # the broker took every reading: it holds them for us
        assert site.count("readings") < truth.totals()["readings"]
        ballast.unlink()
        wait_for(lambda: site.health()[0] == 200, 120, what="/healthz 200 with space again")
        assert_ledger_matches(site, truth)
        assert site.count("dead_letters") == truth.totals()["garbage"]
        wait_for(lambda: {e.get("rule") for e in receiver.events("alert.firing")}
                 >= {"store-writable"}, 60, what="the store alert delivered")
        wait_for(lambda: "store-writable" in {e.get("rule") for e in
                                               receiver.events("alert.resolved")}, 60,
                 what="the store alert resolved")
        alerts = [k for (k,) in site.q("SELECT kind FROM events WHERE rule = 'store-writable'"
                                       " ORDER BY id")]
        assert alerts == ["alert.firing", "alert.resolved"], alerts
        firing = next(e for e in receiver.events("alert.firing")
                      if e.get("rule") == "store-writable")
        assert firing["severity"] == "critical" and "full" in firing["message"]
        assert "alert.firing" in (tmp_path / "daemon.log").read_text(), \
            "the alert is in the journal at once, before the store can hold it"
        assert site.stop() == 0
    finally:
        site.kill()
        receiver.close()


def test_store_disk_full_ci(broker: Mosquitto, tmp_path: Path, small_fs: Path) -> None:
    _disk_full(broker, tmp_path, small_fs, per_meter=300, speed=100, full_s=10)


@pytest.mark.faults_full
def test_store_disk_full_for_minutes(broker: Mosquitto, tmp_path: Path,
                                     small_fs: Path) -> None:
    _disk_full(broker, tmp_path, small_fs, per_meter=3000, speed=100, full_s=180)
