"""Which meters an order addresses: a scope's meters, and which of them a limit sheds.

Reads the configuration and the last power of table ``meters``; writes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from monitor.act import repo
from monitor.act.model import CONFIRMED, DRY_RUN, PENDING, ActionsError, MeterPower, ShedPlan
from monitor.config import Config


class Planner:
    """Scopes and shed plans for one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.cfg = config.actions
        self.meters = {m.id: m for m in config.meters}

    @property
    def dry_run(self) -> bool:
        return self.cfg.mode == "dry_run"

    def resolve(self, scope: str, conn: sqlite3.Connection | None = None) -> tuple[str, ...]:
        """The meter ids of ``scope`` (``site``, ``group:NAME``, ``meter:ID``), from the config.

        ``site`` is every configured meter (with ``conn``: and every meter a
        ``[[meter_patterns]]`` entry configured); a site without either uses every
        meter the store has seen (``conn`` needed).  Raises :class:`ActionsError`
        for an unknown group or meter.
        """
        kind, _, name = scope.partition(":")
        if conn is not None and self.config.meter_patterns:  # meters patterns configure
            self.meters.update(self.config.pattern_meters(repo.meter_devices(conn)))
        if scope == "site":
            if self.meters or conn is None:
                return tuple(self.meters)
            return repo.meter_ids(conn)
        if kind == "group" and name:
            found = tuple(m.id for m in self.meters.values() if m.group == name)
            if not found:
                raise ActionsError(f"scope {scope!r}: no meter is in group {name!r}")
            return found
        if kind == "meter" and name:
            if name not in self.meters:
                raise ActionsError(f"scope {scope!r}: no [[meters]] entry with id {name!r}")
            return (name,)
        raise ActionsError(f"scope {scope!r}: expected site, group:NAME or meter:ID")

    def held_off(self, conn: sqlite3.Connection) -> set[str]:
        """Meters whose order in force is an off order still in effect (pending, confirmed;
        in dry-run mode: recorded)."""
        states = (DRY_RUN,) if self.dry_run else (PENDING, CONFIRMED)
        return repo.held_off(conn, self.dry_run, states)

    def plan_shed(self, conn: sqlite3.Connection, scope: str, target_kw: float) -> ShedPlan:
        """Which meters of ``scope`` to switch off so that its power is at most ``target_kw``.

        Meters already held off by an off order in force count as 0 W and are not
        chosen again.  Groups in ``actions.shed_priority`` are shed first, whole,
        in the listed order; then the other meters one by one, highest power first
        (ties by id).  Shedding stops as soon as the rest is at most the target;
        meters drawing nothing are never chosen.  Power is the last ``power_w``
        of table ``meters`` (unknown: the meter's ``rated_kw``, else 0).
        """
        members = self.resolve(scope, conn)
        power = repo.power(conn)
        held = self.held_off(conn)
        watts = {m: 0.0 if m in held else self._estimate_w(m, power) for m in members}
        target_w = max(0.0, target_kw) * 1000.0
        before = remaining = sum(watts.values())
        shed: list[str] = []
        free = [m for m in members if m not in held]
        for group in self.cfg.shed_priority:
            if remaining <= target_w + 1e-6:
                break
            unit = [m for m in free if m not in shed and self._group(m) == group]
            unit_w = sum(watts[m] for m in unit)
            if unit_w > 0:
                shed.extend(unit)
                remaining -= unit_w
        rest = sorted((m for m in free if m not in shed and watts[m] > 0),
                      key=lambda m: (-watts[m], m))
        for m in rest:
            if remaining <= target_w + 1e-6:
                break
            shed.append(m)
            remaining -= watts[m]
        return ShedPlan(tuple(shed), before, max(0.0, remaining), target_w)

    def _estimate_w(self, meter: str, power: Mapping[str, MeterPower]) -> float:
        """Last power; unknown power counts as the meter's rating (it may be drawing)."""
        p = power.get(meter)
        if p is not None and p.power_w is not None:
            return max(0.0, p.power_w)
        mc = self.meters.get(meter)
        return mc.rated_kw * 1000.0 if mc is not None and mc.rated_kw else 0.0

    def _group(self, meter: str) -> str:
        mc = self.meters.get(meter)
        return mc.group if mc is not None else ""
