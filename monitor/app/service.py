"""The one place that builds real clients and wires them together.

Start order is downstream first: store -> intake worker -> scheduler (checks,
export, webhooks, orders, housekeeping) -> HTTP -> MQTT.  Stop order is
upstream first: MQTT intake stops (unacknowledged messages stay with the
broker), the intake queue is drained and committed, the scheduler finishes its
running jobs, a last export/webhook flush runs, MQTT says ``offline`` and
disconnects, HTTP closes, the store closes.
"""

from __future__ import annotations

import gc
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from monitor import __version__
from monitor.act.orders import Actions
from monitor.app import status as status_mod
from monitor.app.http import HttpServer
from monitor.app.scheduler import Scheduler
from monitor.app.sdnotify import Notifier
from monitor.config import Config
from monitor.intake.flow import IntakeQueue
from monitor.intake.mqtt import MqttLink
from monitor.intake.worker import Intake
from monitor.intake.worker import subscriptions as intake_subscriptions
from monitor.metrics import Metrics
from monitor.outputs import events, webhooks
from monitor.outputs.exporter import Backlog, Exporter
from monitor.outputs.webhooks import WebhookSender
from monitor.rules.check import Checker
from monitor.store import audit, kv
from monitor.store.db import StoreError
from monitor.store.ledger import Store

log = logging.getLogger(__name__)

BACKLOG_TOO_OLD_S = 300.0
EXPORT_BACKLOG_TOO_OLD_S = 3600.0
EXPORT_ALERT_KEY = "export.alert"
STORE_ALERT_KEY = "store.alert"
STORE_ALERT_AFTER_S = 10.0  # commits failing this long raise the store alert
WEBHOOK_BACKLOG_TOO_OLD_S = 900.0
ORDERS_TICK_S = 2.0
WEBHOOK_TICK_S = 2.0
WEBHOOK_ROWS_KEPT_S = 30 * 86400.0
#: the watchdog asks for progress within WatchdogSec, but never less than this: the
#: scheduler's shortest job runs every ORDERS_TICK_S
PROGRESS_MIN_S = 3 * ORDERS_TICK_S
STATUS_EVERY_S = 5.0  # STATUS= updates without a watchdog
DEAD_CHECK_S = 1.0  # how often the main loop looks for a dead intake thread


class _ExportMetrics:
    """Adapts the exporter's metric hooks to the daemon's Prometheus metrics."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def written(self, lines: int, seconds: float) -> None:
        self.m.exported.inc(lines)

    def failed(self, kind: str) -> None:
        self.m.export_errors.labels(kind).inc()

    def dead_lettered(self, lines: int) -> None:
        self.m.export_errors.labels("dead_letter").inc(lines)

    def backlog(self, backlog: Backlog) -> None:
        self.m.outbox_backlog.labels("influxdb").set(backlog.rows)
        self.m.outbox_oldest.labels("influxdb").set(backlog.age_s or 0.0)


class Service:
    """A running daemon.  ``start()`` then ``stop()``; both from the main thread."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier()
        self.clock = clock
        self.metrics = Metrics()
        # room for every unacknowledged QoS 1 message (receive maximum) plus a QoS 0
        # share of one batch: see monitor.intake.flow
        self.queue = IntakeQueue(maxsize=config.mqtt.receive_maximum + config.intake.batch_size,
                                 reserved=config.mqtt.receive_maximum)
        self.store: Store | None = None
        self.intake: Intake | None = None
        self.worker: threading.Thread | None = None
        self.mqtt: MqttLink | None = None
        self.http: HttpServer | None = None
        self.actions: Actions | None = None
        self.checker: Checker | None = None
        self.exporter: Exporter | None = None
        self.sender: WebhookSender | None = None
        self.webhook_oldest_s: float | None = None
        self._store_failing_since: float | None = None
        self._store_alert_owed = ""  # the error of a store alert not yet committed
        self.scheduler = Scheduler(config.site.tz, self.metrics, config.schedule.misfire_grace_s)
        self._readers = threading.local()

    # ------------------------------------------------------------------ helpers

    def reader(self) -> Store:
        """A read-only store connection for the calling thread (HTTP handlers, status)."""
        st: Store | None = getattr(self._readers, "reader", None)
        if st is None:
            st = Store(self.config.storage.path, readonly=True)
            self._readers.reader = st
        return st

    def writer(self) -> Store:
        """A read-write store connection for the calling thread (scheduler jobs).  The
        schema was migrated once at start; these connections do not migrate."""
        st: Store | None = getattr(self._readers, "writer", None)
        if st is None:
            st = Store(self.config.storage.path, migrate_schema=False)
            self._readers.writer = st
        return st

    def subscriptions(self) -> list[tuple[str, int]]:
        return intake_subscriptions(self.config)

    @staticmethod
    def _remember_filters(store: Store, filters: list[str]) -> list[str]:
        """Filters an earlier configuration subscribed to and this one does not.

        The broker keeps a persistent session's subscriptions: a filter removed
        from the config would go on delivering.  The store remembers every filter
        ever subscribed to until it has been unsubscribed at a connect."""
        known = json.loads(store.kv_get("mqtt.filters", "[]") or "[]")
        stale = [f for f in known if f not in filters]
        with store.transaction() as c:
            kv.put(c, "mqtt.filters", json.dumps(sorted(set(filters) | set(stale))))
        return stale

    def health(self) -> list[str]:
        reasons: list[str] = []
        if self.mqtt is None or not self.mqtt.connected.is_set():
            why = self.mqtt.last_error if self.mqtt else "not started"
            reasons.append(f"mqtt: not connected{': ' + why if why else ''}")
        if self.intake is not None and self.intake.commit_error:
            reasons.append("store: not writable, readings are held and not acknowledged: "
                           f"{self.intake.commit_error}")
        if self.worker is None or not self.worker.is_alive():
            reasons.append("intake: worker not running")
        if self.exporter is not None:
            reasons += [f"influxdb: {r}" for r in self.exporter.health.reasons]
        hook_age = self.webhook_oldest_s  # as of the last webhook round
        if hook_age is not None and hook_age > WEBHOOK_BACKLOG_TOO_OLD_S:
            reasons.append(f"webhooks: oldest undelivered event waiting {hook_age:.0f}s")
        depth = self.queue.qsize()
        last = self.intake.last_commit_at if self.intake is not None else None
        if depth and last and self.clock() - last > BACKLOG_TOO_OLD_S:
            reasons.append(f"intake: {depth} messages waiting, last commit "
                           f"{self.clock() - last:.0f}s ago")
        return reasons

    def status(self) -> dict[str, Any]:
        return status_mod.build(self.reader(), self.config, self.clock(), health=self.health())

    # ------------------------------------------------------------------ supervision

    def progress_limit_s(self) -> float:
        wd = self.notifier.watchdog_s
        return max(wd, PROGRESS_MIN_S) if wd else PROGRESS_MIN_S

    def stalled(self) -> list[str]:
        """The components that made no progress within :meth:`progress_limit_s`: the
        intake loop, the store writer and the scheduler (empty: all progressing)."""
        now, limit = time.monotonic(), self.progress_limit_s()
        reasons = []
        if self.worker is None or not self.worker.is_alive():
            reasons.append("intake: worker not running")
        elif self.intake is not None:
            reasons.append(self.intake.stalled(now, limit))
        reasons.append(self.scheduler.stalled(now, limit))
        return [r for r in reasons if r]

    def status_line(self, stalled: Sequence[str] = ()) -> str:
        """The one-line summary systemd shows (``systemctl status``: "Status:")."""
        mqtt = "connected" if self.mqtt is not None and self.mqtt.connected.is_set() \
            else "disconnected"
        last = self.intake.last_commit_at if self.intake is not None else None
        commit = f"last commit {self.clock() - last:.0f}s ago" if last else "no commit yet"
        line = f"mqtt {mqtt}, queue {self.queue.qsize()}, {commit}"
        problems = list(stalled) or self.health()
        if stalled:
            return f"watchdog withheld: {'; '.join(problems)} | {line}"
        if problems:
            return f"degraded: {'; '.join(problems)} | {line}"
        return f"ok: {line}"

    def dead(self) -> str:
        """Why the intake thread is gone though nobody stopped it, or ""."""
        if self.intake is not None and self.intake.failure:
            return f"intake worker died: {self.intake.failure}"
        if self.worker is not None and not self.worker.is_alive():
            return "intake worker ended"
        return ""

    def supervise(self, stop: threading.Event) -> str:
        """The main loop: until ``stop`` is set, tell systemd how we are.

        ``WATCHDOG=1`` is sent every half watchdog interval, and only while
        :meth:`stalled` is empty; so systemd restarts a daemon whose intake, store
        writer or scheduler is wedged.  ``STATUS=`` goes with every notification.
        Returns "" when ``stop`` was set, or why the daemon must stop with a
        failure: a dead intake thread (checked every second, with or without
        systemd) is never left running behind a live process."""
        wd = self.notifier.watchdog_s
        period = min(wd / 2, STATUS_EVERY_S) if wd else STATUS_EVERY_S
        withheld = False
        next_at = time.monotonic() + period
        while not stop.wait(min(period, DEAD_CHECK_S)):
            dead = self.dead()
            if dead:
                log.critical("%s: stopping with a failure (systemd restarts us)", dead)
                self.notifier.status(f"failed: {dead}")
                return dead
            if time.monotonic() < next_at:
                continue
            next_at = time.monotonic() + period
            if not self.notifier.enabled:
                continue
            stalled = self.stalled()
            line = self.status_line(stalled)
            if wd and not stalled:
                if withheld:
                    log.warning("watchdog pings resume: intake, store and scheduler progress")
                    withheld = False
                self.notifier.watchdog(line)
                continue
            if wd and not withheld:
                log.error("watchdog pings withheld, systemd will restart us: %s",
                          "; ".join(stalled))
                withheld = True
            self.notifier.status(line)
        return ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        cfg = self.config
        self.store = Store(cfg.storage.path)
        self.metrics.store_ok.set(1)
        with self.store.transaction() as conn:  # which rules were in force, for the auditor
            audit.append(conn, "config.loaded", {
                "sha256": cfg.digest, "site": cfg.site.id, "version": __version__,
                "rules": [r.id for r in cfg.rules], "mode": cfg.actions.mode}, self.clock())
        subs = self.subscriptions()
        stale = self._remember_filters(self.store, [t for t, _ in subs])
        self.mqtt = MqttLink(cfg, self.queue, self.metrics, subs, unsubscribe=stale)
        self.intake = Intake(cfg, self.store, self.metrics, ack=self.mqtt.ack, queue=self.queue)
        self.worker = threading.Thread(target=self.intake.run, name="intake", daemon=True)
        self.worker.start()
        self.scheduler.every("housekeeping", cfg.schedule.housekeeping_interval_s,
                             self._housekeeping)
        self.actions = Actions(
            cfg, self.mqtt.publish, lambda conn, ev: events.emit(conn, cfg, ev, self.clock()),
            clock=self.clock, connected=self.mqtt.connected.is_set, metrics=self.metrics)
        self.checker = Checker(cfg, self.metrics, self.actions, started_at=self.clock())
        self.scheduler.every("check", cfg.schedule.check_interval_s, self._check)
        self.scheduler.every("orders", ORDERS_TICK_S, self._orders)
        self.sender = WebhookSender(cfg.webhooks, cfg.storage.path,
                                    on_outcome=lambda o: self.metrics.webhook.labels(o).inc())
        self.scheduler.every("webhooks", WEBHOOK_TICK_S, self._webhooks)
        if cfg.influxdb is not None:
            self.exporter = Exporter(cfg.influxdb, cfg.site.id, cfg.storage.path,
                                     metrics=_ExportMetrics(self.metrics),
                                     on_auth_failure=self._export_refused,
                                     max_backlog_age_s=EXPORT_BACKLOG_TOO_OLD_S)
            self.scheduler.every("export", cfg.influxdb.flush_interval_s, self._export)
        self.scheduler.every("meter-freshness", 15.0, self._freshness)
        self.scheduler.every("store-alert", ORDERS_TICK_S, self._store_alert)
        self.scheduler.start()
        if cfg.http.enabled:
            self.http = HttpServer(cfg.http.host, cfg.http.port, health=self.health,
                                   metrics=self.metrics.render, status=self.status)
            self.http.start()
            log.info("HTTP on %s:%d", cfg.http.host, self.http.port)
        self.mqtt.start()
        log.info("energy-monitor %s started (config %s)", cfg.site.id, cfg.digest[:12])
        # what start-up built lives as long as the daemon: out of every later collection,
        # so a full one scans what a check or a batch made, not the config's 10k meters
        # (docs/benchmarks.md, the check); stop() gives it back to the collector
        gc.collect()
        gc.freeze()
        if self.notifier.enabled:
            log.info("systemd notification socket %s, watchdog %s", self.notifier.address,
                     f"{self.notifier.watchdog_s:g}s" if self.notifier.watchdog_s else "off")
            self.notifier.ready(self.status_line())

    def stop(self) -> None:
        self.notifier.stopping("stopping: draining intake, last flush")
        if self.mqtt is not None:
            self.mqtt.stop_intake()
        if self.intake is not None and self.worker is not None and self.worker.is_alive():
            self.intake.stop()  # (a dead worker takes no sentinel: a full queue would block)
            self.worker.join(30)
            if self.worker.is_alive():
                log.error("intake did not drain in 30s (store failing?); giving up")
                self.intake.abort()
                self.worker.join(5)
        self.scheduler.shutdown()
        self._final_flush()
        if self.mqtt is not None:
            self.mqtt.close()
        if self.http is not None:
            self.http.close()
        if self.store is not None:
            self.store.close()
        self.notifier.close()
        gc.unfreeze()
        log.info("energy-monitor stopped")

    def _final_flush(self) -> None:
        """One last export and webhook round, bounded, so a clean stop leaves little behind."""
        jobs: list[tuple[str, Callable[[], None]]] = [
            ("export", self._final_export), ("webhooks", self._webhooks), ("orders", self._orders)]
        for name, fn in jobs:
            try:
                fn()
            except Exception:
                log.exception("final %s flush failed; it resumes at the next start", name)
        if self.exporter is not None:
            self.exporter.close()

    # ------------------------------------------------------------------ jobs

    def _check(self) -> None:
        assert self.checker is not None
        self.checker.run(self.writer(), self.clock())

    def _orders(self) -> None:
        assert self.actions is not None
        self.actions.tick(self.writer().conn, self.clock())

    def _webhooks(self) -> None:
        assert self.sender is not None
        self.sender.deliver_due(self.clock())
        bl = self.sender.backlog(self.clock())
        self.webhook_oldest_s = bl.oldest_age_s
        self.metrics.outbox_backlog.labels("webhooks").set(bl.pending)
        self.metrics.outbox_oldest.labels("webhooks").set(bl.oldest_age_s or 0.0)

    def _final_export(self) -> None:
        self._export(final=True)

    def _export(self, final: bool = False) -> None:
        if self.exporter is None:
            return
        # keep flushing while there is more, up to one interval: a fixed number of
        # batches per interval would cap export below a burst of ingest
        assert self.config.influxdb is not None
        # 80% of the interval: a run that overran would make the scheduler skip the next
        budget_s = 0.8 * self.config.influxdb.flush_interval_s
        started = time.monotonic()
        result = self.exporter.flush(max_batches=10, ignore_backoff=final)
        while result.ok and result.more and time.monotonic() - started < budget_s:
            result = self.exporter.flush(max_batches=10, ignore_backoff=final)
        if result.ok and self.exporter.health.healthy:
            self._export_recovered()

    def _export_recovered(self) -> None:
        """Resolve the alert of a refused export once writes succeed again (kv-persisted,
        so a restart in between still resolves it)."""
        st = self.writer()
        if st.kv_get(EXPORT_ALERT_KEY) is None:
            return
        with st.transaction() as conn:
            kv.delete(conn, EXPORT_ALERT_KEY)
            events.emit(conn, self.config, {
                "kind": "alert.resolved", "severity": "info", "rule": "influxdb-export",
                "scope": "site", "message": "InfluxDB accepts our writes again",
            }, self.clock())

    def _export_refused(self, reason: str) -> None:
        """InfluxDB said 401/403: tell the operator through the webhooks (once per cause)."""
        st = self.writer()
        with st.transaction() as conn:
            kv.put(conn, EXPORT_ALERT_KEY, reason)
            events.emit(conn, self.config, {
                "kind": "alert.firing", "severity": "critical", "rule": "influxdb-export",
                "scope": "site", "message": f"InfluxDB refused our writes: {reason}",
            }, self.clock())

    def _housekeeping(self) -> None:
        st = self.writer()
        keep_from = None
        if self.config.influxdb is not None:  # never delete what InfluxDB has not got yet
            keep_from = int(st.kv_get("export.readings", "0") or 0)
        res = st.housekeeping(self.clock(), self.config.storage.raw_retention_days, keep_from)
        with st.transaction() as conn:  # delivered/undeliverable rows; the events stay
            res["webhook_deliveries"] = webhooks.purge(
                conn, self.clock() - WEBHOOK_ROWS_KEPT_S)
        log.info("housekeeping: %s", res)

    def _store_alert(self) -> None:
        """Intake commits failing (disk full, read-only, locked) for ``STORE_ALERT_AFTER_S``
        raise a critical ``alert.firing`` (rule ``store-writable``), resolved once commits
        succeed again.  The event needs a commit itself: on a full disk it is stored
        (and sent) as soon as the store takes a write; /healthz and the metrics say it
        at once."""
        if self.intake is None:
            return
        error, now = self.intake.commit_error, self.clock()
        if not error:
            self._store_failing_since = None
        elif self._store_failing_since is None:
            self._store_failing_since = now
        elif now - self._store_failing_since >= STORE_ALERT_AFTER_S:
            self._store_alert_owed = self._store_alert_owed or error
        st = self.writer()
        try:
            if self._store_alert_owed:  # kept until committed, even after recovery
                if st.kv_get(STORE_ALERT_KEY) is None:
                    with st.transaction() as conn:
                        kv.put(conn, STORE_ALERT_KEY, self._store_alert_owed)
                        events.emit(conn, self.config, {
                            "kind": "alert.firing", "severity": "critical",
                            "rule": "store-writable", "scope": "site",
                            "message": "the store takes no writes; readings are held by the "
                                       "broker, checks and orders wait: "
                                       f"{self._store_alert_owed}"}, now)
                self._store_alert_owed = ""
            elif not error and st.kv_get(STORE_ALERT_KEY) is not None:
                with st.transaction() as conn:
                    kv.delete(conn, STORE_ALERT_KEY)
                    events.emit(conn, self.config, {
                        "kind": "alert.resolved", "severity": "info",
                        "rule": "store-writable", "scope": "site",
                        "message": "the store takes writes again"}, now)
        except (StoreError, sqlite3.Error) as exc:
            log.warning("store alert not recorded yet (store not writable): %s", exc)

    def _freshness(self) -> None:
        now = self.clock()
        for m in self.reader().meters():
            if m.last_seen is not None:
                self.metrics.meter_age.labels(m.id).set(now - m.last_seen)
