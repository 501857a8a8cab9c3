"""Verification: did the load do what the order said, judged by the meters' own power?

One pass over the live orders (in the caller's transaction) confirms them,
schedules re-sends past the deadline, fails them after the last re-send,
supersedes those that hold no meter any more, and reports a meter that draws
again after a confirmed switch-off.  Dry-run orders are never verified.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence

from monitor.act import repo
from monitor.act.journal import Journal
from monitor.act.model import (
    CONFIRMED,
    FAILED,
    NO_METER,
    PENDING,
    SENT,
    SUPERSEDED,
    MeterPower,
    Order,
    Progress,
    require_transaction,
)
from monitor.config import Config

log = logging.getLogger(__name__)


class Verifier:
    """Checks live orders against the last power of their meters."""

    def __init__(self, config: Config, journal: Journal) -> None:
        self.cfg = config.actions
        self.journal = journal

    def verify(self, conn: sqlite3.Connection, now: float) -> Progress:
        """Check live orders against the meters (in the caller's transaction).

        * ``pending`` off orders: confirmed when every meter they hold reports
          ``power_w < confirm_below_w`` in a reading after the issue time; past the
          deadline re-sent (``resends + 1``, new deadline) up to ``max_resends``,
          then ``failed`` with a critical ``order.failed``.
        * ``failed`` off orders still in force: confirmed late if the meters fall quiet.
        * ``confirmed`` off orders still in force: a meter that draws
          ``>= confirm_below_w`` again (a reading after the confirmation) raises one
          critical ``alert.firing`` per meter and order.
        * ``sent`` resumes: confirmed when every meter they hold draws ``>=
          confirm_below_w`` after the issue time (no deadline, never failed).
        * ``pending``/``sent`` orders that hold no meter any more: ``superseded``.
        """
        require_transaction(conn, "verify()")
        progress = Progress()
        if self.cfg.mode == "dry_run":
            return progress
        owners = repo.owners(conn, dry_run=False)
        power = repo.power(conn)
        for o in repo.live(conn, (PENDING, SENT)):
            keys = o.meters or (NO_METER,)
            mine = [m for m in keys if owners.get(m) == o.order_id]
            if not mine:
                if o.state in (PENDING, SENT):
                    repo.update(conn, o.order_id, now, state=SUPERSEDED, publish_due=None)
                    self.journal.audit(conn, "order.superseded", o, now)
                    progress.superseded.append(o.order_id)
                    self.journal.count(o.action, "superseded")
                continue
            if not o.meters:
                continue  # nothing to measure: an order for a site whose meters are unknown
            if o.off and o.state in (PENDING, FAILED):
                self._check_off(conn, o, mine, power=power, now=now, progress=progress)
            elif o.off and o.state == CONFIRMED:
                self._watch(conn, o, mine, power=power, now=now, progress=progress)
            elif o.action == "resume" and o.state == SENT:
                self._check_on(conn, o, mine, power=power, now=now, progress=progress)
        return progress

    def _check_off(self, conn: sqlite3.Connection, o: Order, mine: Sequence[str], *,
                   power: Mapping[str, MeterPower], now: float, progress: Progress) -> None:
        below = self.cfg.confirm_below_w
        problems: list[str] = []
        for m in mine:
            p = power.get(m)
            if p is None or p.last_seen is None or p.last_seen <= o.issued_at:
                problems.append(f"{m}: no reading since the order")
            elif p.power_w is None:
                problems.append(f"{m}: power unknown")
            elif p.power_w >= below:
                problems.append(f"{m} draws {p.power_w:.0f} W")
        if not problems:
            late = o.state == FAILED
            repo.update(conn, o.order_id, now, state=CONFIRMED, publish_due=None,
                        data={**o.data, "confirmed_at": now, **({"late": True} if late else {})})
            self.journal.audit(conn, "order.confirmed", o, now, state=CONFIRMED,
                               meters_confirmed=list(mine), late=late)
            after = now - o.issued_at
            message = (f"{o.action} of {o.scope} confirmed: {len(mine)} meter(s) below "
                       f"{below:g} W, {after:.0f} s after the order")
            if late:
                message += " (late: it had been reported failed)"
            self.journal.event(conn, o, "order.confirmed", "info", message=message, at=now,
                               meters=mine)
            log.info("order %s: %s", o.order_id, message)
            progress.confirmed.append(o.order_id)
            self.journal.count(o.action, "confirmed")
            return
        if o.state == FAILED:
            return
        deadline = o.deadline if o.deadline is not None else o.issued_at + self.cfg.confirm_within_s
        if now < deadline:
            return
        if o.resends < self.cfg.max_resends:
            resends = o.resends + 1
            repo.update(conn, o.order_id, now, resends=resends,
                        deadline=now + self.cfg.confirm_within_s, publish_due=now)
            self.journal.audit(conn, "order.resent", o, now, resends=resends,
                               meters_resent=list(mine), problems=problems)
            log.warning("order %s (%s of %s) not confirmed, re-sending (%d of %d): %s",
                        o.order_id, o.action, o.scope, resends, self.cfg.max_resends,
                        "; ".join(problems))
            progress.resent.append(o.order_id)
            self.journal.count(o.action, "resent")
            return
        repo.update(conn, o.order_id, now, state=FAILED)
        self.journal.audit(conn, "order.failed", o, now, state=FAILED, problems=problems)
        unsent = " It was never acknowledged by the broker." if o.published_at is None else ""
        message = (f"{o.action} of {o.scope} NOT confirmed {now - o.issued_at:.0f} s after the "
                   f"order and {o.resends} re-send(s): {'; '.join(problems[:10])}"
                   f"{' ...' if len(problems) > 10 else ''}. Switch these loads off by hand."
                   f"{unsent}")
        self.journal.event(conn, o, "order.failed", "critical", message=message, at=now,
                           meters=mine)
        log.error("order %s: %s", o.order_id, message)
        progress.failed.append(o.order_id)
        self.journal.count(o.action, "failed")

    def _watch(self, conn: sqlite3.Connection, o: Order, mine: Sequence[str], *,
               power: Mapping[str, MeterPower], now: float, progress: Progress) -> None:
        below = self.cfg.confirm_below_w
        since = float(o.data.get("confirmed_at", o.updated_at))
        reported = list(o.data.get("violations", []))
        fresh: list[tuple[str, float]] = []
        for m in mine:
            p = power.get(m)
            if (m not in reported and p is not None and p.power_w is not None
                    and p.power_w >= below and p.last_seen is not None and p.last_seen > since):
                fresh.append((m, p.power_w))
        if not fresh:
            return
        reported += [m for m, _ in fresh]
        repo.update(conn, o.order_id, now, data={**o.data, "violations": reported})
        for m, watts in fresh:
            what = ("shutdown" if o.action == "shutdown"
                    else f"switch-off (limit of {o.scope} to {o.target_kw:g} kW)")
            message = (f"meter {m} draws {watts:.0f} W after confirmed {what} "
                       f"(order {o.order_id}, {o.scope}, rule {o.rule or o.actor})")
            self.journal.audit(conn, "order.violation", o, now, meter=m, power_w=watts)
            self.journal.event(conn, o, "alert.firing", "critical", message=message, at=now,
                               meters=[m])
            log.error("%s", message)
            progress.violations.append((o.order_id, m))

    def _check_on(self, conn: sqlite3.Connection, o: Order, mine: Sequence[str], *,
                  power: Mapping[str, MeterPower], now: float, progress: Progress) -> None:
        above = self.cfg.confirm_below_w
        for m in mine:
            p = power.get(m)
            if (p is None or p.power_w is None or p.last_seen is None
                    or p.last_seen <= o.issued_at or p.power_w < above):
                return
        repo.update(conn, o.order_id, now, state=CONFIRMED, data={**o.data, "confirmed_at": now})
        self.journal.audit(conn, "order.confirmed", o, now, state=CONFIRMED,
                           meters_confirmed=list(mine))
        message = (f"resume of {o.scope} confirmed: {len(mine)} meter(s) draw at least "
                   f"{above:g} W again, {now - o.issued_at:.0f} s after the order")
        self.journal.event(conn, o, "order.confirmed", "info", message=message, at=now,
                           meters=mine)
        progress.confirmed.append(o.order_id)
        self.journal.count(o.action, "confirmed")
