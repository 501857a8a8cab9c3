"""Clearing and resuming: what happens to switched-off meters when a breach clears, and an
operator's resume.

A cleared breach resumes the meters its rule's off orders still hold when
``actions.auto_resume`` is set, except meters another rule still in breach
(with a ``shutdown``/``limit`` action) covers; whatever stays off gets an
``order.held`` event saying how to resume it.  Runs in the caller's transaction;
the resume orders themselves are issued by :mod:`monitor.act.issue`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from monitor.act import repo
from monitor.act.issue import Issuer
from monitor.act.journal import Journal
from monitor.act.model import REFUSED, SUPERSEDED, ActionsError, Order, listing, require_transaction
from monitor.act.plan import Planner
from monitor.config import Config

log = logging.getLogger(__name__)


class Resumer:
    """Resume logic for one configuration."""

    def __init__(self, config: Config, planner: Planner, issuer: Issuer,
                 journal: Journal) -> None:
        self.config = config
        self.cfg = config.actions
        self.planner = planner
        self.issuer = issuer
        self.journal = journal

    @property
    def dry_run(self) -> bool:
        return self.cfg.mode == "dry_run"

    def on_clear(self, conn: sqlite3.Connection, rule: str, scope: str, now: float) -> list[Order]:
        """A breach of ``rule`` on ``scope`` cleared (in the caller's transaction).

        The meters that this rule's off orders for ``scope`` still hold are resumed
        when ``actions.auto_resume`` is set -- except meters that another rule,
        still in breach with a ``shutdown``/``limit`` action, covers.  Otherwise (and
        for those kept off) an ``order.held`` event tells the operator what stays
        off and how to resume it.  Returns the resume orders issued.
        """
        require_transaction(conn, "on_clear()")
        held = repo.held_by(conn, self.dry_run, rule, scope, (REFUSED, SUPERSEDED))
        if not held:
            return []
        order_ids = sorted(set(held.values()))
        members = [m for m in self.planner.resolve(scope, conn) if m in held]
        members += sorted(m for m in held if m not in members)
        blocked = self.blocked(conn, rule, scope, members)
        free = [m for m in members if m not in blocked]
        anchor = repo.get(conn, order_ids[-1])
        if anchor is None:  # cannot happen: order_meters names only recorded orders
            raise ActionsError(f"order {order_ids[-1]} holds meters but is not recorded")
        issued: list[Order] = []
        if self.cfg.auto_resume and free:
            result = self.issuer.place(
                conn, action="resume", scope=scope, meters=free, rule=rule,
                reason=f"rule {rule} cleared (actions.auto_resume)", now=now, target_kw=None,
                actor="daemon", data={})
            if result is not None:
                issued.append(result)
        kept = list(members) if not self.cfg.auto_resume else [m for m in members if m in blocked]
        if kept:
            why = "; ".join(f"{m}: rule {blocked[m]} still in breach" for m in kept if m in blocked)
            if self.cfg.auto_resume:
                message = (f"rule {rule} cleared on {scope}, but {len(kept)} meter(s) stay off "
                           f"({why})")
            else:
                message = (f"rule {rule} cleared on {scope}; {len(kept)} meter(s) stay off "
                           f"({listing(kept)}) until an operator resumes them: "
                           f"energy-monitor orders resume {scope}")
                if why:
                    message += f" (note: {why})"
            self.journal.audit(conn, "order.held", anchor, now, held_meters=kept,
                               orders=order_ids, cleared_rule=rule)
            self.journal.event(conn, anchor, "order.held", "info", message=message, at=now,
                               meters=kept)
            log.info("%s", message)
        return issued

    def blocked(self, conn: sqlite3.Connection, rule: str, scope: str,
                meters: Sequence[str]) -> dict[str, str]:
        """meter -> another rule in breach whose shutdown/limit covers it."""
        rules = {r.id: r for r in self.config.rules}
        wanted = set(meters)
        out: dict[str, str] = {}
        for other, other_scope in repo.breaches(conn, rule, scope):
            cfg = rules.get(other)
            if cfg is None or not {"shutdown", "limit"} & set(cfg.on_breach):
                continue
            try:
                covered = self.planner.resolve(other_scope, conn)
            except ActionsError:
                continue
            for m in covered:
                if m in wanted:
                    out.setdefault(m, other)
        return out

    def resume(self, conn: sqlite3.Connection, scope: str, now: float, actor: str = "operator",
               reason: str = "") -> Order:
        """An operator's resume of every meter of ``scope`` (``energy-monitor orders resume``).

        In the caller's transaction; audited as ``operator.resume`` with the actor.
        Never de-duplicated or rate-limited (it still counts towards the limit).
        The daemon publishes it if this process cannot.
        """
        require_transaction(conn, "resume()")
        text = reason or f"resumed by {actor}"
        blocked = self.blocked(conn, "", "", self.planner.resolve(scope, conn))
        if blocked:
            text += "; overriding rules still in breach: " + ", ".join(
                f"{m} ({r})" for m, r in blocked.items())
        result = self.issuer.order(conn, "resume", scope, "", text, now, actor=actor)
        if result is None:  # cannot happen: non-daemon orders are never de-duplicated
            raise ActionsError(f"resume of {scope} was not recorded")
        return result
