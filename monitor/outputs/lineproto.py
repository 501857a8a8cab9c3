"""InfluxDB line protocol: the three measurements of the SPEC, written as text.

Pure functions (no I/O): the check, the events and the exporter build lines
here; :func:`monitor.outputs.exporter.enqueue` queues them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\ ", "\r": r"\ ",
                              "\t": r"\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": " ", "\r": " "})


def ts_ns(ts: float) -> int:
    """Unix seconds (float) -> integer nanoseconds, rounded to the microsecond.

    The rounding makes the timestamp of a reading the same on every replay and
    on every platform, which is what makes a re-write an overwrite.
    """
    return round(ts * 1_000_000) * 1000


def _tag_value(value: str) -> str:
    # Line protocol cannot end a tag value with a backslash (it would escape the
    # separator after it; InfluxDB rejects even a doubled one), so trailing
    # backslashes are dropped.  Control characters become spaces.
    return value.rstrip("\\").translate(_TAG_ESCAPES)


def _tags(pairs: Sequence[tuple[str, str]]) -> str:
    # Sorted by key (InfluxDB's canonical order); empty values are left out, as
    # line protocol has no empty tag value.
    return "".join(
        f",{key}={esc}" for key, value in sorted(pairs) if (esc := _tag_value(value))
    )


def _float(value: float | None) -> str | None:
    if value is None:
        return None
    f = float(value)
    if not math.isfinite(f):
        return None
    return repr(f)


def _fields(pairs: Sequence[tuple[str, str | None]]) -> str:
    return ",".join(f"{key}={value}" for key, value in pairs if value is not None)


def _string(value: str) -> str:
    return '"' + value.translate(_STRING_ESCAPES) + '"'


def reading_line(site: str, meter: str, group: str, fmt: str, ts: float, *,
                 power_w: float | None, energy_kwh: float | None,
                 delta_kwh: float | None, voltage_v: float | None = None,
                 current_a: float | None = None) -> str | None:
    """One ``energy_reading`` line, or ``None`` when no field has a finite value.

    NULL (``None``) and non-finite fields are left out; ``delta_kwh`` (what the
    ledger accounted) is written as ``energy_delta_kwh``.
    """
    fields = _fields([
        ("power_w", _float(power_w)),
        ("energy_kwh", _float(energy_kwh)),
        ("energy_delta_kwh", _float(delta_kwh)),
        ("voltage_v", _float(voltage_v)),
        ("current_a", _float(current_a)),
    ])
    if not fields:
        return None
    tags = _tags([("site", site), ("meter", meter), ("group", group), ("format", fmt)])
    return f"energy_reading{tags} {fields} {ts_ns(ts)}"


def rule_line(
    site: str, rule: str, scope: str, value: float | None, limit: float | None,
    ratio: float | None, projected: float | None, state_int: int, ts: float,
) -> str:
    """One ``energy_rule`` line: a rule's verdict for one scope at ``ts``.

    ``state_int`` is 0 ok, 1 warning, 2 breach (written as an integer field);
    ``value``/``limit``/``ratio``/``projected`` are floats, left out when None.
    Pure: the rules module calls it and puts the result into ``export_outbox``.
    """
    if state_int not in (0, 1, 2):
        raise ValueError(f"state_int must be 0, 1 or 2, not {state_int!r}")
    fields = _fields([
        ("value", _float(value)),
        ("limit", _float(limit)),
        ("ratio", _float(ratio)),
        ("projected", _float(projected)),
        ("state", f"{int(state_int)}i"),
    ])
    tags = _tags([("site", site), ("rule", rule), ("scope", scope)])
    return f"energy_rule{tags} {fields} {ts_ns(ts)}"


def event_line(site: str, kind: str, rule: str, message: str, ts: float) -> str:
    """One ``energy_event`` line (Grafana annotations): tags site, kind, rule; field message.

    ``kind`` is an event kind such as ``alert.firing``, ``order.issued`` or
    ``meter.stale``; ``rule`` may be empty (then the tag is left out).  Newlines
    in ``message`` become spaces.  Pure, like :func:`rule_line`.
    """
    tags = _tags([("site", site), ("kind", kind), ("rule", rule)])
    return f"energy_event{tags} message={_string(message)} {ts_ns(ts)}"
