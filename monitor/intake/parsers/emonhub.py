"""OpenEnergyMonitor emonhub: node-variable topics or a JSON object per node.

* ``<base>/<node>/<input>``: one plain value (the default "node variable" format).
* ``<base>/<node>``: ``{"P1": 100, "E1": 2000, "Vrms": 239.1, "time": 1700000000, ...}``.
* ``emonhub/rx/<id>/values`` (legacy CSV): ``unsupported_format``; switch the
  interfacer to the node-variable or JSON format.

Inputs read, as ``emonhub/<node>:<channel>``:

* power in W, signed (a CT on an exporting circuit reads negative): ``P<n>``
  (emonTx4/emonPi2), ``power<n>`` (emonTx3/emonPi), ``powerL<n>`` and
  ``P_L<n>``-style names of the three-phase emonTx3 firmware (channel ``L<n>``);
* energy ``E<n>`` in Wh -> kWh (firmware totals, lifetime, reset when the
  emonTx restarts; a negative total, an exporting CT, is skipped).

Skipped with their reasons: ``power1pluspower2`` and other ``...plus...``
sums (``phase_sum``), ``pulse``/``pulsecount`` (a pulse count needs the
meter's pulses per kWh; not read), and every other input (``Vrms``, ``V1``,
``T1``, ``temp1``, ``MSG``, ``rssi``, ``battery`` ...: ``not_energy_value``).
``Vrms`` (or ``V1``) is attached as voltage to the readings of the same JSON
message.  ``time`` (Unix seconds, set by emonhub) is the reading's time when
present, else the receipt time.  ``base_topic`` defaults to ``emon``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from monitor.core.model import ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    Values,
    aux,
    check_options,
    decode,
    epoch,
    ignored,
    kind,
    kwh_from_wh,
    load_json,
    stamp,
    str_option,
    text_number,
)

#: P1, power1, powerL1, P_L1, power_L1, E1 (case as emonhub sends them)
_INPUT = re.compile(r"^(P|power|E)_?(L?)0*(\d{1,2})$")


def _input(name: str) -> tuple[str, bool] | str:
    """(channel, is_energy) of an input name, or the reason it is not read."""
    m = _INPUT.match(name)
    if m is not None:
        head, phase, digits = m.groups()
        return (phase + (digits.lstrip("0") or "0"), head == "E")
    low = name.lower()
    if "plus" in low or low.endswith("sum"):
        return "phase_sum"
    if low.startswith("pulse"):
        return "pulse_count"
    return "not_energy_value"


class EmonhubParser:
    """Parser for ``format = "emonhub"``.  Option ``base_topic`` (default ``emon``)."""

    def __init__(
        self, options: Mapping[str, object] | None = None, registry: object = None,
        topic_filter: str | None = None,
    ) -> None:
        opts = check_options("emonhub", options, ("base_topic",))
        self._prefix = str_option("emonhub", opts, "base_topic", "emon") + "/"

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        segs = topic.split("/")
        if len(segs) >= 3 and segs[-3] == "rx" and segs[-2].isdigit():
            raise ParseError(
                "unsupported_format",
                "legacy emonhub/rx/<id>/values CSV; set the MQTT interfacer to the "
                "node-variable (nodevar_format_enable) or JSON format",
            )
        if not topic.startswith(self._prefix):
            raise ParseError("unknown_topic", f"{topic!r} is not under {self._prefix!r}")
        node, sep, name = topic[len(self._prefix):].partition("/")
        if not node:
            raise ParseError("unknown_topic", topic)
        device = "emonhub/" + node
        if not sep:
            return _json(device, payload, received_at)
        if not name or "/" in name:
            raise ParseError("unknown_topic", f"{topic!r} is not <base>/<node>/<input>")
        what = _input(name)
        if isinstance(what, str):
            return ignored(what)  # Vrms alone, temperatures, pulse count, rssi, ...
        channel, is_energy = what
        vals = Values()
        text = decode(payload)
        value: float | None
        try:
            value = text_number(text, f"{node}/{name}")
        except ParseError as exc:
            vals.bad(exc)
            value = None
        if value is not None and is_energy:
            value = vals.counter(value, f"{node}/{name}")
        readings = []
        if value is not None:
            readings.append(Reading(
                f"{device}:{channel}", received_at, TsSource.RECEIVED,
                None if is_energy else value, kwh_from_wh(value) if is_energy else None,
            ))
        return vals.result(readings)


def _json(device: str, payload: bytes, received_at: float) -> ParseResult:
    doc = load_json(payload)
    if not isinstance(doc, dict):
        raise ParseError("wrong_type", f"node payload is {kind(doc)}, expected an object")
    vals = Values()
    channels: dict[str, list[float | None]] = {}
    for key, value in doc.items():
        what = _input(key)
        if isinstance(what, str):
            if key not in ("time", "Vrms", "vrms"):
                vals.skip(what)
            continue
        channel, is_energy = what
        slot = channels.setdefault(channel, [None, None])
        if is_energy:
            kwh = vals.counter(value, key)
            slot[1] = None if kwh is None else kwh_from_wh(kwh)
        else:
            slot[0] = vals.power(value, key)
    device_ts = epoch(doc.get("time"))
    ts, source = stamp(device_ts, received_at)
    volts = aux(doc.get("Vrms", doc.get("vrms", doc.get("V1"))))
    readings = [
        Reading(f"{device}:{channel}", ts, source, power_w, energy_kwh,
                voltage_v=volts, device_ts=device_ts)
        for channel, (power_w, energy_kwh) in channels.items()
        if power_w is not None or energy_kwh is not None
    ]
    if not readings and not vals.errors:
        return ignored(vals.skipped[0] if vals.skipped else "not_energy_value")
    return vals.result(readings)
