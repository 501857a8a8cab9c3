"""Issuing orders: de-duplication, the rate limit and its refusals, the recorded order.

Everything here runs inside the caller's transaction and publishes nothing:
an issued order gets ``publish_due`` and :mod:`monitor.act.publish` sends it
after the commit.  Which order is in force for a meter is table
``order_meters``; a new order takes over the meters it names.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from monitor.act import repo
from monitor.act.journal import Journal
from monitor.act.model import (
    ACTIONS,
    CONFIRMED,
    DRY_RUN,
    OFF_ACTIONS,
    PENDING,
    RATE_WINDOW_S,
    REFUSED,
    SENT,
    ActionsError,
    Order,
    kw,
    listing,
    require_transaction,
)
from monitor.act.plan import Planner
from monitor.config import Config
from monitor.core.timefmt import rfc3339
from monitor.core.verdict import Verdict

log = logging.getLogger(__name__)


class Issuer:
    """Records new orders (``order``, ``place``) for one configuration."""

    def __init__(self, config: Config, planner: Planner, journal: Journal,
                 new_id: Callable[[float], str]) -> None:
        self.cfg = config.actions
        self.planner = planner
        self.journal = journal
        self.new_id = new_id

    @property
    def dry_run(self) -> bool:
        return self.cfg.mode == "dry_run"

    def for_verdict(self, conn: sqlite3.Connection, verdict: Verdict,
                    actions: Iterable[str], now: float) -> Order | None:
        """The off order one alert step asks for: ``shutdown`` and/or ``limit`` of the
        verdict's scope.  ``shutdown`` wins over ``limit``; a ``limit`` whose verdict has
        no ``target_kw`` is carried out as a shutdown (logged).  In the caller's
        transaction; ``None`` when neither is asked for or nothing is to be done."""
        wanted = set(actions)
        evidence = {"value": verdict.value, "limit": verdict.limit, "unit": verdict.unit,
                    "period": verdict.period, "projected": verdict.projected}
        if "shutdown" in wanted or ("limit" in wanted and verdict.target_kw is None):
            if "shutdown" not in wanted:
                log.warning("rule %s asks for a limit of %s without a target: ordering a shutdown",
                            verdict.rule, verdict.scope)
            return self.order(conn, "shutdown", verdict.scope, verdict.rule, verdict.message,
                              now, evidence=evidence)
        if "limit" in wanted:
            return self.order(conn, "limit", verdict.scope, verdict.rule, verdict.message,
                              now, target_kw=verdict.target_kw, evidence=evidence)
        return None

    def order(
        self,
        conn: sqlite3.Connection,
        action: str,
        scope: str,
        rule: str,
        reason: str,
        now: float,
        target_kw: float | None = None,
        actor: str = "daemon",
        *,
        evidence: Mapping[str, Any] | None = None,
    ) -> Order | None:
        """Record an order for ``scope`` (inside the caller's transaction; publishes nothing).

        ``limit`` needs ``target_kw``: it becomes an off order for the meters
        :meth:`Planner.plan_shed` picks, recorded with ``target_kw``.  ``evidence``
        (``value``, ``limit``, ``unit``, ``period``, ``projected`` of the verdict)
        is carried into the events.  What is returned: see :meth:`place`.
        """
        require_transaction(conn, "order()")
        if action not in ACTIONS:
            raise ActionsError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        data: dict[str, Any] = {}
        if evidence:
            data["evidence"] = {k: evidence[k] for k in ("value", "limit", "unit", "period",
                                                         "projected") if k in evidence}
        if action == "limit":
            if target_kw is None or not math.isfinite(target_kw):
                raise ActionsError("a limit order needs a finite target_kw")
            plan = self.planner.plan_shed(conn, scope, target_kw)
            if not plan.shed:
                log.info("limit %s to %.1f kW (rule %s): nothing to switch off (%s now)",
                         scope, target_kw, rule, kw(plan.before_w))
                return None
            meters = plan.shed
            data["shed"] = {"before_w": round(plan.before_w, 1), "after_w": round(plan.after_w, 1),
                            "reaches_target": plan.reaches_target}
        else:
            meters = self.planner.resolve(scope, conn)
            target_kw = None
        return self.place(conn, action=action, scope=scope, meters=meters, rule=rule,
                          reason=reason, now=now, target_kw=target_kw, actor=actor, data=data)

    def place(self, conn: sqlite3.Connection, *, action: str, scope: str,
              meters: Sequence[str], rule: str, reason: str, now: float,
              target_kw: float | None, actor: str, data: dict[str, Any]) -> Order | None:
        """Record ``action`` of ``meters`` (of ``scope``), under the daemon's two guards.

        Returns the new order (state ``pending``, ``sent`` or ``dry_run``); the
        refused order (state ``refused``) when the scope had
        ``actions.max_orders_per_hour`` orders in the last hour -- a repeated
        refusal within that hour returns the first one, counted in its
        ``data["repeats"]``; ``None`` when every meter is already under an
        identical order in force (pending or confirmed).  Orders of an ``actor``
        other than ``daemon`` are never de-duplicated nor refused (an operator is
        in the loop).
        """
        if actor == "daemon":
            if self.duplicate(conn, action, meters):
                log.debug("%s %s (rule %s): identical order already in force", action, scope,
                          rule)
                return None
            count, first = repo.recent(conn, scope, self.dry_run, now - RATE_WINDOW_S)
            if count >= self.cfg.max_orders_per_hour:
                return self._refuse(conn, action=action, scope=scope, meters=meters, rule=rule,
                                    reason=reason, now=now, target_kw=target_kw,
                                    reopens_at=(first or now) + RATE_WINDOW_S, data=data)
        return self._issue(conn, action=action, scope=scope, meters=meters, rule=rule,
                           reason=reason, now=now, target_kw=target_kw, actor=actor, data=data)

    def duplicate(self, conn: sqlite3.Connection, action: str, meters: Sequence[str]) -> bool:
        """Whether every one of ``meters`` is already under an ``action`` order in force
        (off orders: pending or confirmed; resumes: sent or confirmed)."""
        if not meters:
            return False
        dry = self.dry_run
        owners = repo.owners(conn, dry)
        ids = {owners.get(m) for m in meters}
        if None in ids:
            return False
        rows = repo.actions_and_states(conn, {i for i in ids if i is not None})
        if len(rows) != len(ids):
            return False
        if action in OFF_ACTIONS:
            live = (DRY_RUN,) if dry else (PENDING, CONFIRMED)
            return all(a in OFF_ACTIONS and s in live for a, s in rows)
        live = (DRY_RUN,) if dry else (SENT, CONFIRMED)
        return all(a == "resume" and s in live for a, s in rows)

    def _issue(self, conn: sqlite3.Connection, *, action: str, scope: str,
               meters: Sequence[str], rule: str, reason: str, now: float,
               target_kw: float | None, actor: str, data: dict[str, Any]) -> Order:
        dry = self.dry_run
        off = action in OFF_ACTIONS
        if dry:
            state, deadline, due = DRY_RUN, None, None
        elif off and meters:
            state, deadline, due = PENDING, now + self.cfg.confirm_within_s, now
        else:
            state, deadline, due = SENT, None, now
        order = Order(order_id=self.new_id(now), action=action, scope=scope,
                      meters=tuple(meters), rule=rule, reason=reason, issued_at=now,
                      state=state, deadline=deadline, target_kw=target_kw, actor=actor,
                      dry_run=dry, updated_at=now, publish_due=due, data=data)
        repo.insert(conn, order)
        repo.hold(conn, meters, dry, order.order_id)
        kind = "operator.resume" if actor != "daemon" and action == "resume" else "order.issued"
        self.journal.audit(conn, kind, order, now)
        what = f"{action} of {scope}"
        if action == "limit":
            shed = data.get("shed", {})
            what = (f"limit {scope} to {target_kw:g} kW: switch off {len(meters)} meter(s), "
                    f"{kw(float(shed.get('before_w', 0)))} -> "
                    f"{kw(float(shed.get('after_w', 0)))}")
        by = f"rule {rule}" if rule else f"{actor}"
        if meters:
            what += f" ({listing(list(meters))})"
        else:
            what += " (no meters known: cannot be verified)"
        message = f"{what} ordered by {by}: {reason}" if reason else f"{what} ordered by {by}"
        if dry:
            message = f"[dry run, not sent] {message}"
        severity = "warning" if off else "info"
        self.journal.event(conn, order, "order.issued", severity, message=message, at=now)
        self.journal.count(action, "dry_run" if dry else "issued")
        log.log(logging.WARNING if off else logging.INFO, "order %s: %s", order.order_id, message)
        return order

    def _refuse(self, conn: sqlite3.Connection, *, action: str, scope: str,
                meters: Sequence[str], rule: str, reason: str, now: float,
                target_kw: float | None, reopens_at: float, data: dict[str, Any]) -> Order:
        dry = self.dry_run
        limit = self.cfg.max_orders_per_hour
        first = repo.last_refused(conn, scope, action, dry, now - RATE_WINDOW_S)
        if first is not None:
            repeats = int(first.data.get("repeats", 0)) + 1
            again = replace(first, data={**first.data, "repeats": repeats}, updated_at=now)
            repo.update(conn, first.order_id, now, data=again.data)
            log.warning("%s of %s (rule %s) refused again (%d times since %s): more than %d "
                        "orders for this scope in the last hour", action, scope, rule, repeats,
                        rfc3339(first.issued_at), limit)
            return again
        data = {**data, "reopens_at": reopens_at}
        order = Order(order_id=self.new_id(now), action=action, scope=scope,
                      meters=tuple(meters), rule=rule, reason=reason, issued_at=now,
                      state=REFUSED, target_kw=target_kw, dry_run=dry, updated_at=now, data=data)
        repo.insert(conn, order)
        self.journal.audit(conn, "order.refused", order, now)
        message = (f"{action} of {scope} REFUSED, nothing sent: already {limit} orders for this "
                   f"scope in the last hour (actions.max_orders_per_hour); the load is NOT "
                   f"switched; the next order is possible after {rfc3339(reopens_at)}")
        if reason:
            message += f". Reason given: {reason}"
        self.journal.event(conn, order, "order.failed",
                           "critical" if action in OFF_ACTIONS else "warning", message=message,
                           at=now)
        log.error("order %s: %s", order.order_id, message)
        self.journal.count(action, "refused")
        return order
