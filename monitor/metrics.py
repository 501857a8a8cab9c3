"""Prometheus metrics of one daemon instance, in its own registry (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """All counters and gauges the daemon exposes on ``/metrics``.  Thread-safe."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "energy_monitor_"
        self.readings = Counter(p + "readings", "Readings and messages by format and outcome",
                                ["format", "outcome"], registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Dead-lettered payloads by reason",
                                    ["reason"], registry=r)
        self.anomalies = Counter(p + "anomalies", "Counter resets, quarantined increments...",
                                 ["kind"], registry=r)
        self.outcomes = Counter(p + "intake_outcomes",
                                "Messages ignored and values skipped, by reason (never silent)",
                                ["outcome", "reason", "format"], registry=r)
        self.messages_received = Counter(p + "mqtt_messages_received",
                                         "MQTT messages received", registry=r)
        self.queue_dropped = Counter(p + "queue_dropped",
                                     "QoS 0 messages dropped because the intake queue was full",
                                     registry=r)
        self.queue_blocked = Counter(p + "queue_blocked",
                                     "Times the MQTT thread waited for a full intake queue",
                                     registry=r)
        self.read_paused = Counter(
            p + "mqtt_read_paused",
            "Times the MQTT thread paused reading because the intake queue was full",
            registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Messages waiting in the intake queue",
                                 registry=r)
        self.mqtt_connected = Gauge(p + "mqtt_connected", "1 while connected to the broker",
                                    registry=r)
        self.mqtt_connects = Counter(p + "mqtt_connects", "Successful (re)connections",
                                     registry=r)
        self.store_ok = Gauge(p + "store_writable", "1 while the last store commit succeeded",
                              registry=r)
        self.store_errors = Counter(p + "store_errors", "Failed store commits (retried)",
                                    registry=r)
        self.commit_seconds = Histogram(p + "store_commit_seconds", "Store commit latency",
                                        registry=r,
                                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
        self.last_commit = Gauge(p + "store_last_commit_timestamp_seconds",
                                 "Time of the last successful commit", registry=r)
        self.jobs = Counter(p + "job_runs", "Scheduled job runs by job and outcome",
                            ["job", "outcome"], registry=r)
        self.rule_state = Gauge(p + "rule_state", "0 ok, 1 warning, 2 breach",
                                ["rule", "scope"], registry=r)
        self.rule_ratio = Gauge(p + "rule_ratio", "Value / limit", ["rule", "scope"], registry=r)
        self.meter_age = Gauge(p + "meter_last_seen_age_seconds",
                               "Seconds since each meter was last seen", ["meter"], registry=r)
        self.outbox_backlog = Gauge(p + "outbox_backlog", "Rows waiting per outbox",
                                    ["outbox"], registry=r)
        self.outbox_oldest = Gauge(p + "outbox_oldest_age_seconds",
                                   "Age of the oldest waiting row per outbox", ["outbox"],
                                   registry=r)
        self.export_errors = Counter(p + "export_errors", "Failed InfluxDB writes by kind",
                                     ["kind"], registry=r)
        self.exported = Counter(p + "exported_rows", "Rows written to InfluxDB", registry=r)
        self.webhook = Counter(p + "webhook_deliveries", "Webhook delivery attempts by outcome",
                               ["outcome"], registry=r)
        self.orders = Counter(p + "orders", "Orders by action and outcome",
                              ["action", "outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
