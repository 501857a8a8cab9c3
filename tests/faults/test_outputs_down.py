"""The InfluxDB-compatible server (VictoriaMetrics) and the webhook receiver down while
readings stream and alerts fire: nothing lost, everything delivered once they return."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from sim import simulate
from tests.daemon import wait_for
from tests.faults.harness import SimRun, Site, assert_ledger_matches, fleet_body, options
from tests.servers import Mosquitto
from tests.test_e2e_actions import Receiver
from tests.tsdb import victoria_metrics

SECRET = "fault-suite-secret"


def _outputs_down(broker: Mosquitto, tmp_path: Path, per_meter: int, speed: float,
                  outage_s: float) -> None:
    # device-timestamped formats: every reading is its own point in VictoriaMetrics
    fleet = simulate.Fleet.build(6, ("json", "shelly_gen2", "zigbee2mqtt"), site="flt",
                                 seed=31, interval_s=10)
    opts = options(per_meter, 10, seed=31, speed=speed)
    receiver = Receiver(SECRET)  # closed: connection refused until open()
    (tmp_path / "hook.secret").write_text(SECRET)
    (tmp_path / "influx.token").write_text("token\n")
    with victoria_metrics(tmp_path / "vm") as vm:
        site = Site(tmp_path, broker.port, fleet_body(fleet, f"""
[influxdb]
url = "{vm.url}"
org = "mining"
bucket = "energy"
token_file = "{tmp_path / 'influx.token'}"
flush_interval_s = 1
timeout_s = 5

[schedule]
check_interval_s = 1

[[rules]]
id = "day-cap"
kind = "energy_cap"
period = "calendar_day"
scope = "site"
limit_kwh = 5
warn_at = [0.5]
on_breach = ["alert"]

[[webhooks]]
url = "{receiver.url}"
secret_file = "{tmp_path / 'hook.secret'}"
"""))
        site.start()
        sim = SimRun(fleet, opts, broker.port).start()
        wait_for(lambda: site.count("readings") > 50, 60, what="readings flowing")
        vm.stop()
        t_down = time.monotonic()
        wait_for(lambda: (site.metric("energy_monitor_export_errors_total") or 0) > 0, 60,
                 what="the exporter notices the outage")
        while time.monotonic() - t_down < outage_s:
            time.sleep(1)
        backlog = site.metric("energy_monitor_outbox_backlog", outbox="influxdb")
        assert backlog is not None and backlog > 0, "readings wait in the export outbox"
        truth = sim.join()
        events = {r[0]: r[1] for r in site.q("SELECT event_id, kind FROM events")}
        assert "alert.firing" in events.values(), "the cap fired while the receiver was down"
        assert not receiver.delivered()
        vm.start()
        receiver.open()
        try:
            assert_ledger_matches(site, truth)
            rows = site.count("readings")
            wait_for(lambda: site.metric("energy_monitor_outbox_backlog",
                                         outbox="influxdb") == 0, 600, interval_s=1,
                     what="export backlog drained")
            series = vm.export('{__name__="energy_reading_energy_delta_kwh"}')
            points = sum(len(s.timestamps_ms) for s in series)
            assert points == rows, "every reading exported, none twice"
            for s in series:
                assert len(set(s.timestamps_ms)) == len(s.timestamps_ms), s.labels
            kwh = {s.labels["meter"]: sum(s.values) for s in series}
            for mid, mt in truth.meters.items():
                assert kwh.get(mid, 0.0) == pytest.approx(mt.observable_kwh, abs=1e-4), mid
            wait_for(lambda: set(events) <= set(receiver.delivered()), 900, interval_s=1,
                     what="every event delivered after the receiver came back")
            twice = {e: len(h) for e, h in receiver.delivered().items() if len(h) > 1}
            assert not twice, f"events delivered more than once: {twice}"
            assert all(h.signature_ok for h in receiver.snapshot())
            kinds = Counter(events.values())
            assert kinds["alert.firing"] >= 1
        finally:
            receiver.close()
        assert site.stop() == 0


def test_tsdb_and_webhooks_down_ci(broker: Mosquitto, tmp_path: Path) -> None:
    _outputs_down(broker, tmp_path, per_meter=300, speed=100, outage_s=20)


@pytest.mark.faults_full
def test_tsdb_and_webhooks_down_for_minutes(broker: Mosquitto, tmp_path: Path) -> None:
    _outputs_down(broker, tmp_path, per_meter=3000, speed=100, outage_s=240)
