"""APScheduler 3 wiring: every periodic job of the daemon, protected the same way.

Each job has an explicit id, ``coalesce=True`` (a backlog of missed runs is one
run), ``max_instances=1`` (never overlaps itself), a misfire grace time, and is
wrapped so that an exception is logged and counted and the next run still
happens.  The scheduler runs in the site's time zone.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler

from monitor.metrics import Metrics

log = logging.getLogger(__name__)


class Scheduler:
    """A thin owner of one :class:`BackgroundScheduler`."""

    def __init__(self, tz: ZoneInfo, metrics: Metrics, misfire_grace_s: float = 30.0) -> None:
        self.metrics = metrics
        self.grace = int(max(1, misfire_grace_s))
        self.sched = BackgroundScheduler(timezone=tz)
        #: time.monotonic() of the last finished job run (ok or error): watchdog progress
        self.last_done = time.monotonic()

    def every(self, job_id: str, seconds: float, func: Callable[[], object]) -> None:
        """Run ``func`` every ``seconds``, first run right after start."""

        def guarded() -> None:
            try:
                func()
            except Exception:
                self.metrics.jobs.labels(job_id, "error").inc()
                log.exception("job %s failed; it runs again in %ss", job_id, seconds)
            else:
                self.metrics.jobs.labels(job_id, "ok").inc()
            finally:
                self.last_done = time.monotonic()

        self.sched.add_job(
            guarded, "interval", seconds=seconds, id=job_id, name=job_id,
            coalesce=True, max_instances=1, misfire_grace_time=self.grace,
            replace_existing=True, next_run_time=dt.datetime.now(self.sched.timezone),
        )

    def start(self) -> None:
        self.last_done = time.monotonic()
        self.sched.start()

    def stalled(self, now: float, limit_s: float) -> str:
        """Why the scheduler made no progress for ``limit_s`` (monotonic ``now``), or ""."""
        if not self.sched.running:
            return "scheduler: not running"
        if now - self.last_done > limit_s:
            return f"scheduler: no job finished for {now - self.last_done:.0f}s"
        return ""

    def shutdown(self) -> None:
        if self.sched.running:
            self.sched.shutdown(wait=True)
