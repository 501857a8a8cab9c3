"""The one object the daemon holds for its orders: :class:`Actions`, which only delegates.

The service wires one :class:`Actions` per daemon and hands it to the check
(:class:`monitor.rules.check.OrderSink`: ``apply``, ``publish_pending``) and to
the ``orders`` job (``tick``); the CLI uses it for ``orders resume`` and
``orders list``.  Each job lives in its own module:

* :mod:`monitor.act.plan` -- a scope's meters and which of them a limit sheds;
* :mod:`monitor.act.issue` -- recording an order: de-duplication, the rate limit, refusals;
* :mod:`monitor.act.resume` -- what a cleared breach and an operator's resume switch on;
* :mod:`monitor.act.verify` -- confirmation, re-sends, failure, violations, by metered power;
* :mod:`monitor.act.publish` -- MQTT publication after the commit, at least once;
* :mod:`monitor.act.journal` -- the audit entry, event and count every change leaves;
* :mod:`monitor.act.repo` -- all SQL on ``orders`` and ``order_meters``;
* :mod:`monitor.act.model` -- the shared values (:class:`Order`, states, ids, device commands).

The contract with the rest of the daemon:

* ``order``, ``apply``, ``on_clear``, ``resume`` and ``verify`` write inside the
  **caller's transaction** (they raise :class:`ActionsError` when ``conn`` has
  none): the ``orders`` row, the ``order_meters`` rows, the audit entries and
  the events commit together or not at all.  They publish nothing.
* ``publish_pending`` publishes, **after the commit** (it refuses to run inside
  a transaction).  Call it right after committing an order, from a periodic
  job, and once at start-up.  ``tick`` is that job: ``verify`` in its own
  transaction, then ``publish_pending``.
* ``mode = "dry_run"`` records orders (``state 'dry_run'``, ``dry_run = 1``) and
  their events, and publishes nothing at all.

Which order is *in force* for a meter: the latest non-refused order that names
it (table ``order_meters``).  Details, states and message formats:
``docs/orders.md``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from monitor.act import repo
from monitor.act.issue import Issuer
from monitor.act.journal import Journal
from monitor.act.model import ActionsError, AuditAppend, Emit, Order, Progress, Publish, UlidFactory
from monitor.act.plan import Planner
from monitor.act.publish import ACK_TIMEOUT_S, PUBLISH_RETRY_S, Publisher
from monitor.act.resume import Resumer
from monitor.act.verify import Verifier
from monitor.config import Config
from monitor.core.verdict import Verdict
from monitor.metrics import Metrics
from monitor.store import audit
from monitor.store.db import transaction

#: what callers of the facade catch (defined in :mod:`monitor.act.model`)
__all__ = ["Actions", "ActionsError"]


class Actions:
    """Issues, publishes and verifies orders.  Thread-safe: share one instance, give
    each thread its own connection.

    ``publish(topic, payload, qos, retain)`` is :meth:`monitor.intake.mqtt.MqttLink.publish`
    (``None``: record only, e.g. in a CLI process; the daemon publishes later).
    ``emit(conn, event)`` records one SPEC event body (the daemon's calls
    ``monitor.outputs.events.emit``) inside the caller's transaction.  Order
    changes are also written to the audit log (``audit_append``), so ``emit``
    need not.  ``connected()``, when given, gates publishing.  ``metrics``, when
    given, counts outcomes in ``energy_monitor_orders{action, outcome}``.
    """

    def __init__(
        self,
        config: Config,
        publish: Publish | None,
        emit: Emit,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[float], str] | None = None,
        audit_append: AuditAppend = audit.append,
        connected: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        retry_s: float = PUBLISH_RETRY_S,
    ) -> None:
        self.config = config
        self.clock = clock
        journal = Journal(config.site.id, emit, audit_append, metrics)
        self.planner = Planner(config)
        self.issuer = Issuer(config, self.planner, journal, new_id or UlidFactory())
        self.resumer = Resumer(config, self.planner, self.issuer, journal)
        self.verifier = Verifier(config, journal)
        self.publisher = Publisher(config, publish, clock=clock, connected=connected,
                                   ack_timeout_s=ack_timeout_s, retry_s=retry_s)

    # ------------------------------------------------------------------ in the caller's transaction

    def order(self, conn: sqlite3.Connection, action: str, scope: str, rule: str, reason: str,
              now: float, target_kw: float | None = None, actor: str = "daemon", *,
              evidence: Mapping[str, Any] | None = None) -> Order | None:
        """:meth:`monitor.act.issue.Issuer.order`."""
        return self.issuer.order(conn, action, scope, rule, reason, now, target_kw, actor,
                                 evidence=evidence)

    def apply(self, conn: sqlite3.Connection, verdict: Verdict, actions: Iterable[str],
              breach_cleared: bool, now: float) -> list[Order]:
        """Carry out what one alert step asked for (``monitor.rules.alerts.on_actions``):
        the off order of :meth:`~monitor.act.issue.Issuer.for_verdict`, then
        :meth:`on_clear` when a breach cleared."""
        out = [self.issuer.for_verdict(conn, verdict, actions, now)]
        if breach_cleared:
            out.extend(self.resumer.on_clear(conn, verdict.rule, verdict.scope, now))
        return [o for o in out if o is not None]

    def on_clear(self, conn: sqlite3.Connection, rule: str, scope: str, now: float) -> list[Order]:
        """:meth:`monitor.act.resume.Resumer.on_clear`."""
        return self.resumer.on_clear(conn, rule, scope, now)

    def resume(self, conn: sqlite3.Connection, scope: str, now: float, actor: str = "operator",
               reason: str = "") -> Order:
        """:meth:`monitor.act.resume.Resumer.resume`."""
        return self.resumer.resume(conn, scope, now, actor, reason)

    def verify(self, conn: sqlite3.Connection, now: float) -> Progress:
        """:meth:`monitor.act.verify.Verifier.verify`."""
        return self.verifier.verify(conn, now)

    # ------------------------------------------------------------------ after the commit

    def publish_pending(self, conn: sqlite3.Connection, now: float | None = None) -> int:
        """:meth:`monitor.act.publish.Publisher.publish_pending`."""
        return self.publisher.publish_pending(conn, now)

    def tick(self, conn: sqlite3.Connection, now: float | None = None) -> Progress:
        """The scheduler job (every few seconds): :meth:`verify` in one transaction, then
        :meth:`publish_pending` (also picks up orders other processes recorded)."""
        t = self.clock() if now is None else now
        with transaction(conn):
            progress = self.verifier.verify(conn, t)
        self.publisher.publish_pending(conn, now)
        return progress

    # ------------------------------------------------------------------ queries

    def resolve(self, scope: str, conn: sqlite3.Connection | None = None) -> tuple[str, ...]:
        """:meth:`monitor.act.plan.Planner.resolve`: the meter ids of ``scope``."""
        return self.planner.resolve(scope, conn)

    @staticmethod
    def get(conn: sqlite3.Connection, order_id: str) -> Order | None:
        """The order ``order_id``, or ``None``."""
        return repo.get(conn, order_id)

    @staticmethod
    def list_orders(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` orders, newest first (``energy-monitor orders list``)."""
        return [o.as_dict() for o in repo.newest(conn, limit)]
