"""Scheduled jobs: a job that raises is logged and counted, and runs again."""

from __future__ import annotations

import threading
from zoneinfo import ZoneInfo

import pytest

from monitor.app.scheduler import Scheduler
from monitor.metrics import Metrics


def test_a_failing_job_is_counted_and_still_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    sched = Scheduler(ZoneInfo("Asia/Irkutsk"), metrics)
    runs = 0
    third = threading.Event()

    def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs >= 3:
            third.set()
        if runs % 2:
            raise RuntimeError("boom")

    sched.every("flaky", 0.2, flaky)
    sched.start()
    try:
        assert third.wait(20), "the job stopped running after it raised"
    finally:
        sched.shutdown()
    errors = metrics.registry.get_sample_value("energy_monitor_job_runs_total",
                                               {"job": "flaky", "outcome": "error"})
    oks = metrics.registry.get_sample_value("energy_monitor_job_runs_total",
                                            {"job": "flaky", "outcome": "ok"})
    assert errors is not None and errors >= 2 and oks is not None and oks >= 1
    assert "job flaky failed" in caplog.text


def test_jobs_never_overlap_and_coalesce() -> None:
    sched = Scheduler(ZoneInfo("UTC"), Metrics())
    sched.every("slow", 0.1, lambda: None)
    job = sched.sched.get_job("slow")
    assert job is not None
    assert job.max_instances == 1 and job.coalesce is True
    assert job.misfire_grace_time is not None and job.misfire_grace_time >= 1
