"""mbmd (Modbus gateway): ``mbmd/<device>/<Measurement>`` with a ``%.3f`` payload.

mbmd publishes every measurement a meter has, one topic each; per-phase values
as ``<Measurement>/L<n>`` (``PowerL1`` is read the same way).  Read, as
``mbmd/<device>``:

* ``Power`` W, signed (negative while the meter exports);
* ``Import`` kWh (lifetime imported active energy);
* ``Export`` kWh (lifetime exported active energy) -> ``export_kwh``.

A meter that publishes no device total but per-phase values (``Power/L1`` ...
``Power/L3`` without ``Power``; ``Import/L1`` ... without ``Import``) is read
as the sum of its phases: each phase value is kept (``phase_pending``) and the
sum is emitted when the last phase of the meter's cycle arrives.  The phases
a meter has are learnt from its first cycle (a phase seen twice ends it).
Once the device total is seen, phase values are skipped (``phase_value``).

``Sum`` is import + export: never consumption.  Beside ``Import`` it is
skipped (``import_plus_export``).  A meter that publishes ``Sum`` but no
``Import`` is the dead letter ``unconfigured_meter`` from its second ``Sum``
on (the first is ``sum_pending``: its ``Import`` may follow); a meter that
cannot export may be read from ``Sum`` with the option ``sum_as_import``
(comma-separated device names, or ``"*"`` for all).

Skipped with their reasons: ``ImportPower``/``ExportPower`` (one direction
only), reactive and apparent values, tariff counters (``ImportT1`` ...), and
every other measurement (``Voltage``, ``Current``, ``Frequency``, ``Cosphi``,
...).  ``mbmd/status`` (the gateway's connection state, not a meter's) is
ignored.  mbmd sends no time: readings are stamped on receipt.  ``base_topic``
defaults to ``mbmd``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from monitor.core.model import ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    check_options,
    ignored,
    names_option,
    str_option,
    text_measurement,
    text_power,
)

_READ = ("Power", "Import", "Export")
_PHASED = re.compile(r"^([A-Za-z]+?)(L[1-9])$")
_MAX_DEVICES = 65536


def _reason(measure: str) -> str:
    low = measure.lower()
    if measure in ("ImportPower", "ExportPower"):
        return "directional_power"
    if low.startswith("reactive"):
        return "reactive_energy" if low != "reactivepower" else "reactive_power"
    if low.startswith("apparent"):
        return "apparent_power"
    if re.fullmatch(r"(Import|Export|Sum)T\d", measure):
        return "tariff_counter"
    return "not_energy_value"


class _Phases:
    """The phase values of one (device, quantity) that has no device total."""

    __slots__ = ("closed", "order", "values")

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.order: list[str] = []  # the phases of the meter, learnt from its first cycle
        self.closed = False


class _Device:
    __slots__ = ("has_import", "has_total", "phases", "sums")

    def __init__(self) -> None:
        self.has_total: set[str] = set()  # quantities published as device totals
        self.has_import = False
        self.sums = 0
        self.phases: dict[str, _Phases] = {}


class MbmdParser:
    """Parser for ``format = "mbmd"``.  Options ``base_topic``, ``sum_as_import``."""

    def __init__(
        self, options: Mapping[str, object] | None = None, registry: object = None,
        topic_filter: str | None = None,
    ) -> None:
        opts = check_options("mbmd", options, ("base_topic", "sum_as_import"))
        self._prefix = str_option("mbmd", opts, "base_topic", "mbmd") + "/"
        self._sum_as_import = names_option("mbmd", opts, "sum_as_import")
        self._devices: dict[str, _Device] = {}

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        if not topic.startswith(self._prefix):
            raise ParseError("unknown_topic", f"{topic!r} is not under {self._prefix!r}")
        segs = topic[len(self._prefix):].split("/")
        if not segs[0]:
            raise ParseError("unknown_topic", topic)
        if len(segs) == 1:
            if segs[0] == "status":
                return ignored("gateway_status")
            raise ParseError("unknown_topic", f"{topic!r} is not <base>/<device>/<Measurement>")
        if len(segs) > 3 or not segs[1] or (len(segs) == 3 and not segs[2]):
            raise ParseError("unknown_topic", f"{topic!r} is not <base>/<device>/<Measurement>")
        name, measure = segs[0], segs[1]
        phase = segs[2] if len(segs) == 3 else ""
        if not phase:
            m = _PHASED.match(measure)
            if m is not None:
                measure, phase = m.group(1), m.group(2)
        if measure not in _READ and measure != "Sum":
            return ignored(_reason(measure))
        device = "mbmd/" + name
        state = self._devices.get(name)
        if state is None:
            state = _Device()
            if len(self._devices) < _MAX_DEVICES:
                self._devices[name] = state
        if measure == "Sum":
            if phase:
                return ignored("phase_value")
            if name in self._sum_as_import or "*" in self._sum_as_import:
                measure = "Import"
            else:
                return self._sum(name, state)
        read = text_power if measure == "Power" else text_measurement
        value = read(payload, topic)
        if measure == "Import":
            state.has_import = True
        if phase:
            if measure in state.has_total:
                return ignored("phase_value")
            total = self._phase(state, measure, phase, value)
            if total is None:
                return ignored("phase_pending")
            value = total
        else:
            state.has_total.add(measure)
            state.phases.pop(measure, None)
        return ParseResult(readings=(_reading(device, received_at, measure, value),))

    def _sum(self, name: str, state: _Device) -> ParseResult:
        if state.has_import:
            return ignored("import_plus_export")
        state.sums += 1
        if state.sums < 2:
            return ignored("sum_pending")
        raise ParseError(
            "unconfigured_meter",
            f"mbmd device {name!r} publishes Sum (import + export) but no Import; if it "
            f"never exports, list it in the source option sum_as_import = \"{name}\"",
        )

    @staticmethod
    def _phase(state: _Device, measure: str, phase: str, value: float) -> float | None:
        """The phase sum when ``phase`` ends the meter's cycle, else None (kept)."""
        ph = state.phases.get(measure)
        if ph is None:
            ph = state.phases[measure] = _Phases()
        if not ph.closed:
            if phase in ph.values:  # the first cycle is complete: its phases are known
                ph.closed = True
            else:
                ph.order.append(phase)
                ph.values[phase] = value
                return None
        if phase not in ph.order:  # a phase not seen in the first cycle: learn it
            ph.order.append(phase)
        ph.values[phase] = value
        if phase != ph.order[-1] or len(ph.values) < len(ph.order):
            return None
        return round(sum(ph.values[p] for p in ph.order), 6)


def _reading(device: str, received_at: float, measure: str, value: float) -> Reading:
    if measure == "Power":
        return Reading(device, received_at, TsSource.RECEIVED, value)
    if measure == "Import":
        return Reading(device, received_at, TsSource.RECEIVED, None, value)
    return Reading(device, received_at, TsSource.RECEIVED, None, None, export_kwh=value)
