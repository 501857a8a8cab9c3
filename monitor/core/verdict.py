"""What a rule says: the value the rules produce and every other package reads.

Evaluation (``monitor.rules``) makes verdicts; alerts, orders, the status page and
the report read them.  It lives in the core so that the readers need not
import the rules.  Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["ok", "warning", "breach"]


@dataclass(frozen=True)
class Verdict:
    """What one rule says about one scope at ``Snapshot.now``.

    ``level`` is the highest ``warn_at`` fraction crossed (1.0 in breach, 0 when
    ok, and 0 for a warning of a kind without ``warn_at``).  ``ratio`` is
    value / limit where that means something.  ``target_kw`` is the power a
    ``limit`` action should order the scope down to.  ``period`` labels the
    period the value belongs to (energy caps: "2026-11"; ban windows: the window
    "2025-11-15..2026-03-15"; otherwise "").
    """

    rule: str
    kind: str
    scope: str
    state: State
    message: str
    meters: tuple[str, ...]
    level: float = 0.0
    value: float | None = None
    limit: float | None = None
    unit: str = ""
    ratio: float | None = None
    projected: float | None = None
    seconds_to_limit: float | None = None
    period: str = ""
    target_kw: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
