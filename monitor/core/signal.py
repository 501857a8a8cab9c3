"""Curtailment requests from the grid operator or an aggregator: the value and its parser.

A signal is ``{"target_kw": 0, "until": "2026-11-27T18:00:00Z"}`` on a configured
topic; intake parses it, the store keeps the latest per topic, the curtailment
rule reads it.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from monitor.core.timefmt import parse_rfc3339


@dataclass(frozen=True, slots=True)
class Signal:
    """The latest curtailment request received on a topic."""

    target_kw: float
    until: float  # Unix seconds; the request is active while until > now
    received_at: float

    def active(self, now: float) -> bool:
        return self.until > now



def _parse_until(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError("curtailment signal: 'until' must be an RFC 3339 time, not a boolean")
    if isinstance(raw, int | float):
        if not math.isfinite(raw):
            raise ValueError("curtailment signal: 'until' is not a finite number")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(
            "curtailment signal: 'until' must be an RFC 3339 time such as "
            '"2026-11-27T18:00:00Z"'
        )
    try:
        return parse_rfc3339(raw)
    except ValueError as exc:
        raise ValueError(
            f"curtailment signal: 'until' {raw!r}: {exc} (e.g. \"2026-11-27T18:00:00Z\")"
        ) from exc


def parse_signal(payload: bytes, received_at: float) -> Signal:
    """Read a curtailment request ``{"target_kw": 0, "until": "2026-11-27T18:00:00Z"}``.

    ``until`` may also be Unix seconds.  Other keys are ignored.  Raises
    :class:`ValueError` with a message fit for the dead-letter table.
    """
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"curtailment signal is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(
            'curtailment signal must be a JSON object like {"target_kw": 0, "until": "..."}'
        )
    if "target_kw" not in data:
        raise ValueError("curtailment signal lacks 'target_kw'")
    if "until" not in data:
        raise ValueError("curtailment signal lacks 'until'")
    target = data["target_kw"]
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise ValueError(f"curtailment signal: 'target_kw' must be a number, got {target!r}")
    if not math.isfinite(target) or target < 0:
        raise ValueError(f"curtailment signal: 'target_kw' must be >= 0, got {target!r}")
    return Signal(target_kw=float(target), until=_parse_until(data["until"]),
                  received_at=received_at)
