"""Numbered SQLite migrations.  Applied in order by :func:`monitor.store.db.migrate`, each
recorded in ``schema_migrations``; never edit a released migration, append a new one.

Times are Unix seconds (REAL, UTC).  Power is W.  Energy at rest in the ledger and
its rollups is whole milliwatt-hours (INTEGER ``mwh`` columns, since migration 9), so
every sum of them is exact; raw readings keep the device's kWh as REAL.
"""

from __future__ import annotations

from typing import NamedTuple


class Table(NamedTuple):
    """Who may write a table (one package) and who reads it directly with SQL."""

    writer: str
    readers: tuple[str, ...]
    what: str


#: Every table of the store: its one writing package and its direct SQL readers.
#: ``tests/test_architecture.py`` fails when a module outside ``writer`` writes a
#: table or one not listed reads it.  ``kv`` is written only through
#: :mod:`monitor.store.kv`, whose docstring lists which package owns which key.
TABLES: dict[str, Table] = {
    "schema_migrations": Table("monitor.store", (), "migrations applied"),
    "meters": Table("monitor.store", ("monitor.act", "monitor.app", "monitor.outputs",
                                      "monitor.report", "monitor.rules"),
                    "every meter seen: identity, last reading, accounting state"),
    "readings": Table("monitor.store", ("monitor.outputs",), "raw readings (retention)"),
    "ledger": Table("monitor.store", ("monitor.report",), "mWh per meter per 15 min"),
    "daily": Table("monitor.store", ("monitor.report",), "mWh per meter per local day"),
    "monthly": Table("monitor.store", (), "mWh per meter per local month"),
    "yearly": Table("monitor.store", (), "mWh per meter per local year"),
    "ledger_versions": Table("monitor.store", (), "batches that wrote each ledger bucket"),
    "gaps": Table("monitor.store", ("monitor.report",), "data gaps and their bounds"),
    "anomalies": Table("monitor.store", ("monitor.report",), "resets, jumps, jitter"),
    "dead_letters": Table("monitor.store", ("monitor.app", "monitor.report"),
                          "refused messages, whole"),
    "intake_outcomes": Table("monitor.store", (), "counted ignored/skipped reasons"),
    "msg_seen": Table("monitor.store", (), "redelivery fingerprints"),
    "signals": Table("monitor.store", ("monitor.rules",), "latest curtailment requests"),
    "audit": Table("monitor.store", ("monitor.report",), "the tamper-evident hash chain"),
    "kv": Table("monitor.store", ("monitor.outputs",), "small named values (store.kv)"),
    "alert_state": Table("monitor.rules", ("monitor.act", "monitor.app", "monitor.report"),
                         "each rule and scope's alert state"),
    "meter_notices": Table("monitor.rules", (), "stale/unknown meter notices sent"),
    "orders": Table("monitor.act", ("monitor.report", "monitor.rules"), "shutdown orders"),
    "order_meters": Table("monitor.act", (), "each order's meters and their progress"),
    "events": Table("monitor.outputs", ("monitor.app", "monitor.report"),
                    "every event, for webhooks"),
    "webhook_deliveries": Table("monitor.outputs", (), "one row per event and webhook"),
    "export_outbox": Table("monitor.outputs", (), "line protocol waiting for InfluxDB"),
    "export_dead_letters": Table("monitor.outputs", (), "lines InfluxDB refused"),
}

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

        -- one row per meter: identity, freshness and the accounting state that a
        -- restart resumes from (last counter, last power sample)
        CREATE TABLE meters (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            grp TEXT NOT NULL DEFAULT '',
            format TEXT NOT NULL DEFAULT '',
            first_seen REAL,
            last_seen REAL,
            power_w REAL,
            online INTEGER NOT NULL DEFAULT 1,
            acct TEXT NOT NULL DEFAULT '{}'
        ) WITHOUT ROWID;

        -- raw readings, kept raw_retention_days; rowid is the export cursor
        CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            meter TEXT NOT NULL,
            ts REAL NOT NULL,
            power_w REAL,
            energy_kwh REAL,
            delta_kwh REAL NOT NULL DEFAULT 0,
            voltage_v REAL,
            current_a REAL,
            flags TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX readings_ts ON readings (ts);

        -- the energy ledger: accounted kWh per meter per fixed 900 s bucket (UTC
        -- aligned, so every local midnight of every real time zone is a bucket edge)
        CREATE TABLE ledger (
            meter TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            kwh REAL NOT NULL,
            PRIMARY KEY (meter, bucket)
        ) WITHOUT ROWID;
        CREATE INDEX ledger_bucket ON ledger (bucket);

        -- rollup of the ledger per local calendar day (site time zone), plus gaps
        CREATE TABLE daily (
            meter TEXT NOT NULL,
            day TEXT NOT NULL,
            kwh REAL NOT NULL DEFAULT 0,
            gap_kwh REAL NOT NULL DEFAULT 0,
            gap_s REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (day, meter)
        ) WITHOUT ROWID;

        -- intervals with no trustworthy data; upper_kwh = rated_kw x duration (NULL: unknown)
        CREATE TABLE gaps (
            id INTEGER PRIMARY KEY,
            meter TEXT NOT NULL,
            start_ts REAL NOT NULL,
            end_ts REAL NOT NULL,
            upper_kwh REAL,
            reason TEXT NOT NULL
        );
        CREATE INDEX gaps_end ON gaps (end_ts);

        -- counter resets, quarantined implausible increments, jitter: evidence for audits
        CREATE TABLE anomalies (
            id INTEGER PRIMARY KEY,
            meter TEXT NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            value REAL,
            detail TEXT NOT NULL DEFAULT ''
        );

        CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            received_at REAL NOT NULL,
            topic TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL,
            payload BLOB
        );
        CREATE INDEX dead_letters_at ON dead_letters (received_at);

        -- fingerprints of the last committed messages, so a QoS 1 redelivery
        -- (DUP flag) after a crash between commit and PUBACK is recognised
        CREATE TABLE msg_seen (seq INTEGER PRIMARY KEY, fp BLOB NOT NULL UNIQUE);

        -- ---------------------------------------------------------------- rules, actions
        -- one row per (rule, scope): the alert state machine, so a restart neither
        -- re-fires nor forgets
        CREATE TABLE alert_state (
            rule TEXT NOT NULL,
            scope TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'ok',
            level REAL NOT NULL DEFAULT 0,
            since REAL,
            notified_at REAL,
            period TEXT NOT NULL DEFAULT '',
            data TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (rule, scope)
        ) WITHOUT ROWID;

        -- every event (alert.*, order.*, meter.*), durable before anyone is told
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            severity TEXT NOT NULL,
            rule TEXT NOT NULL DEFAULT '',
            scope TEXT NOT NULL DEFAULT '',
            at REAL NOT NULL,
            body TEXT NOT NULL
        );

        -- the webhook outbox: one row per (event, webhook), at-least-once delivery
        CREATE TABLE webhook_deliveries (
            event_id TEXT NOT NULL,
            webhook TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            created_at REAL NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (event_id, webhook)
        ) WITHOUT ROWID;
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at);

        CREATE TABLE orders (
            order_id TEXT PRIMARY KEY,
            action TEXT NOT NULL,
            scope TEXT NOT NULL,
            rule TEXT NOT NULL DEFAULT '',
            meters TEXT NOT NULL DEFAULT '[]',
            target_kw REAL,
            reason TEXT NOT NULL DEFAULT '',
            issued_at REAL NOT NULL,
            state TEXT NOT NULL,
            resends INTEGER NOT NULL DEFAULT 0,
            deadline REAL,
            updated_at REAL NOT NULL,
            actor TEXT NOT NULL DEFAULT 'daemon',
            dry_run INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID;

        -- hash-chained, append-only: hash = sha256(prev_hash || canonical body)
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );

        -- latest curtailment signal per topic
        CREATE TABLE signals (
            topic TEXT PRIMARY KEY,
            target_kw REAL,
            until REAL,
            received_at REAL NOT NULL,
            payload TEXT NOT NULL
        ) WITHOUT ROWID;

        -- ---------------------------------------------------------------- export
        -- InfluxDB line-protocol rows other than readings (energy_rule, energy_event);
        -- readings are exported from `readings` by rowid cursor (kv 'export.readings')
        CREATE TABLE export_outbox (id INTEGER PRIMARY KEY, line TEXT NOT NULL);
        """,
    ),
    (
        3,
        """
        -- export lines InfluxDB rejected for their content (HTTP 400/413/422), isolated by
        -- bisecting the batch; kept with the server's reason so an operator can fix and
        -- re-queue them (INSERT INTO export_outbox (line) SELECT line FROM ...)
        CREATE TABLE export_dead_letters (
            id INTEGER PRIMARY KEY,
            line TEXT NOT NULL,
            reason TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX export_dead_letters_at ON export_dead_letters (at);
        """,
    ),
    (
        4,
        """
        -- orders: the publication outbox and per-order extras (monitor/actions.py).
        -- publish_due: the order's MQTT messages are due at this time (NULL: nothing to
        -- publish); cleared only once the broker acknowledged them, so a crash between
        -- commit and publication re-sends.  data: JSON (shed plan, evidence, violations).
        ALTER TABLE orders ADD COLUMN publish_due REAL;
        ALTER TABLE orders ADD COLUMN published_at REAL;
        ALTER TABLE orders ADD COLUMN data TEXT NOT NULL DEFAULT '{}';
        CREATE INDEX orders_scope ON orders (scope, issued_at);
        CREATE INDEX orders_state ON orders (state);
        CREATE INDEX orders_due ON orders (publish_due) WHERE publish_due IS NOT NULL;

        -- the order in force for each meter: the latest non-refused order naming it,
        -- per mode (dry_run 0/1); meter '' holds orders that name no meter
        CREATE TABLE order_meters (
            meter TEXT NOT NULL,
            dry_run INTEGER NOT NULL,
            order_id TEXT NOT NULL,
            PRIMARY KEY (meter, dry_run)
        ) WITHOUT ROWID;
        CREATE INDEX order_meters_order ON order_meters (order_id);
        """,
    ),
    (
        5,
        """
        -- the start of the interval a reading's delta_kwh was consumed over (the meter's
        -- previous accounted reading; = ts for an instant, NULL when nothing was
        -- accounted): windows shorter than a ledger bucket are summed from these
        ALTER TABLE readings ADD COLUMN since_ts REAL;
        """,
    ),
    (
        6,
        """
        -- redelivery fingerprints without the unique index: it made every commit
        -- slower as the table grew (random 16-byte keys); the table is now trimmed
        -- to the last 65,536 messages at every commit and scanned only when a
        -- message arrives with the DUP flag
        DROP TABLE msg_seen;
        CREATE TABLE msg_seen (seq INTEGER PRIMARY KEY, fp BLOB NOT NULL);
        """,
    ),
    (
        7,
        """
        -- rollup of `daily` per local calendar month, kept in the same transaction:
        -- a rule check reads one row per meter for a month and at most twelve for a
        -- year, instead of every day of the year
        CREATE TABLE monthly (
            meter TEXT NOT NULL,
            month TEXT NOT NULL,
            kwh REAL NOT NULL DEFAULT 0,
            gap_kwh REAL NOT NULL DEFAULT 0,
            gap_s REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (month, meter)
        ) WITHOUT ROWID;
        INSERT INTO monthly (meter, month, kwh, gap_kwh, gap_s)
            SELECT meter, substr(day, 1, 7), sum(kwh), sum(gap_kwh), sum(gap_s)
            FROM daily GROUP BY meter, substr(day, 1, 7);
        """,
    ),
    (
        8,
        """
        -- the device's own clock when it was not trusted for `ts` (a Tasmota "Time"
        -- without an offset, a 1970 date): kept as evidence, never used for accounting
        ALTER TABLE readings ADD COLUMN device_ts REAL;
        """,
    ),
    (
        9,
        """
        -- energy at rest as whole milliwatt-hours: the check, `status` and the report add
        -- the same integers and agree to the last digit (REAL sums depended on the order)
        CREATE TABLE ledger_mwh (
            meter TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            mwh INTEGER NOT NULL,
            PRIMARY KEY (meter, bucket)
        ) WITHOUT ROWID;
        INSERT INTO ledger_mwh SELECT meter, bucket, CAST(round(kwh * 1000000) AS INTEGER)
            FROM ledger;
        DROP TABLE ledger;
        ALTER TABLE ledger_mwh RENAME TO ledger;
        CREATE INDEX ledger_bucket ON ledger (bucket);

        CREATE TABLE daily_mwh (
            meter TEXT NOT NULL,
            day TEXT NOT NULL,
            mwh INTEGER NOT NULL DEFAULT 0,
            export_mwh INTEGER NOT NULL DEFAULT 0,
            gap_kwh REAL NOT NULL DEFAULT 0,
            gap_s REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (day, meter)
        ) WITHOUT ROWID;
        INSERT INTO daily_mwh (meter, day, mwh, gap_kwh, gap_s)
            SELECT meter, day, CAST(round(kwh * 1000000) AS INTEGER), gap_kwh, gap_s FROM daily;
        DROP TABLE daily;
        ALTER TABLE daily_mwh RENAME TO daily;

        CREATE TABLE monthly_mwh (
            meter TEXT NOT NULL,
            month TEXT NOT NULL,
            mwh INTEGER NOT NULL DEFAULT 0,
            export_mwh INTEGER NOT NULL DEFAULT 0,
            gap_kwh REAL NOT NULL DEFAULT 0,
            gap_s REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (month, meter)
        ) WITHOUT ROWID;
        INSERT INTO monthly_mwh (meter, month, mwh, gap_kwh, gap_s)
            SELECT meter, substr(day, 1, 7), sum(mwh), sum(gap_kwh), sum(gap_s)
            FROM daily GROUP BY meter, substr(day, 1, 7);
        DROP TABLE monthly;
        ALTER TABLE monthly_mwh RENAME TO monthly;

        -- the exported active energy counter of net-metering meters (never consumption)
        ALTER TABLE readings ADD COLUMN export_kwh REAL;

        -- messages and values the intake did not turn into readings nor dead letters,
        -- by outcome ('ignored': whole messages, 'skipped': values inside a message) and
        -- reason: nothing a device sent vanishes uncounted
        CREATE TABLE intake_outcomes (
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL,
            format TEXT NOT NULL,
            n INTEGER NOT NULL DEFAULT 0,
            last_at REAL,
            PRIMARY KEY (outcome, reason, format)
        ) WITHOUT ROWID;

        -- one row per notice raised about a meter (meter.unknown): raised once
        CREATE TABLE meter_notices (
            meter TEXT NOT NULL,
            kind TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (meter, kind)
        ) WITHOUT ROWID;
        CREATE INDEX anomalies_ts ON anomalies (ts);
        """,
    ),
    (
        10,
        """
        -- rollup of `monthly` per local calendar year, kept in the same transaction: a
        -- year's total is one row per meter, not twelve rows summed and sorted by meter
        CREATE TABLE yearly (
            meter TEXT NOT NULL,
            year TEXT NOT NULL,
            mwh INTEGER NOT NULL DEFAULT 0,
            export_mwh INTEGER NOT NULL DEFAULT 0,
            gap_kwh REAL NOT NULL DEFAULT 0,
            gap_s REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (year, meter)
        ) WITHOUT ROWID;
        INSERT INTO yearly (meter, year, mwh, export_mwh, gap_kwh, gap_s)
            SELECT meter, substr(month, 1, 4), sum(mwh), sum(export_mwh), sum(gap_kwh),
                   sum(gap_s)
            FROM monthly GROUP BY meter, substr(month, 1, 4);

        -- how many committed batches wrote each ledger bucket, bumped in the batch's own
        -- transaction: a reader may keep a bucket's rows while its count is unchanged
        -- (the rule check's window sums); a bucket without a row is never kept
        CREATE TABLE ledger_versions (
            bucket INTEGER PRIMARY KEY,
            n INTEGER NOT NULL
        );
        """,
    ),
    (
        11,
        """
        -- redelivery fingerprints carry their packet id, indexed: a re-delivered message
        -- is looked up by its id instead of by a scan of the table, so four times as many
        -- are kept (262,144), for a broker that re-sends far more than Receive Maximum
        -- after a reconnect (mosquitto < 2.0.13).  Ids are mostly increasing, so the
        -- index grows at its end.  Rows from before keep id 0 and are still compared.
        ALTER TABLE msg_seen ADD COLUMN mid INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX msg_seen_mid ON msg_seen (mid);
        """,
    ),
]
