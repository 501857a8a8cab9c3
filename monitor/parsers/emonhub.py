"""OpenEnergyMonitor emonhub: node-variable topics or a JSON object per node.

* ``<base>/<node>/<input>``: one plain value (the default "node variable" format).
* ``<base>/<node>``: ``{"P1": 100, "E1": 2000, "Vrms": 239.1, "time": 1700000000, ...}``.
* ``emonhub/rx/<id>/values`` (legacy CSV): ``unsupported_format``; switch the
  interfacer to the node-variable or JSON format.

Inputs read, as ``emonhub/<node>:<n>``: ``P<n>`` and ``power<n>`` W (emonTx4,
emonTx3/emonPi), ``E<n>`` Wh -> kWh (firmware totals, lifetime, reset when the
emonTx restarts).  ``Vrms`` is attached as voltage to the readings of the same
message; a message with only ``Vrms`` is ignored, as are all other inputs
(``T1``, ``pulse``, ``MSG``, ``rssi``, ``power1pluspower2`` ...).  ``time``
(Unix seconds, set by emonhub) is the reading's time when present, else the
receipt time.  ``base_topic`` defaults to ``emon``.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.model import ParseError, ParseResult, Reading, TsSource
from monitor.parsers.common import (
    IGNORED,
    aux,
    check_options,
    epoch,
    kind,
    kwh_from_wh,
    load_json,
    measurement,
    stamp,
    str_option,
    text_measurement,
)


def _channel(digits: str) -> str | None:
    """``"01"`` -> ``"1"``; None unless plain ASCII digits."""
    if digits.isascii() and digits.isdigit():
        return digits.lstrip("0") or "0"
    return None


def _input(name: str) -> tuple[str, bool] | None:
    """(channel, is_energy) of an input name, or None if it is not read."""
    head = name[:1]
    if head in ("P", "E"):
        channel = _channel(name[1:])
        return None if channel is None else (channel, head == "E")
    if name[:5] == "power":
        channel = _channel(name[5:])
        return None if channel is None else (channel, False)
    return None


class EmonhubParser:
    """Parser for ``format = "emonhub"``.  Option ``base_topic`` (default ``emon``)."""

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
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
        if what is None:
            return IGNORED  # Vrms alone, temperatures, pulse count, rssi, ...
        channel, is_energy = what
        value = text_measurement(payload, f"{node}/{name}")
        return ParseResult(readings=(Reading(
            f"{device}:{channel}", received_at, TsSource.RECEIVED,
            None if is_energy else value, kwh_from_wh(value) if is_energy else None,
        ),))


def _json(device: str, payload: bytes, received_at: float) -> ParseResult:
    doc = load_json(payload)
    if not isinstance(doc, dict):
        raise ParseError("wrong_type", f"node payload is {kind(doc)}, expected an object")
    channels: dict[str, list[float | None]] = {}
    for key, value in doc.items():
        what = _input(key)
        if what is None:
            continue
        channel, is_energy = what
        slot = channels.setdefault(channel, [None, None])
        if is_energy:
            slot[1] = kwh_from_wh(measurement(value, key))
        else:
            slot[0] = measurement(value, key)
    if not channels:
        return IGNORED
    device_ts = epoch(doc.get("time"))
    ts, source = stamp(device_ts, received_at)
    volts = aux(doc.get("Vrms", doc.get("vrms")))
    return ParseResult(readings=tuple(
        Reading(f"{device}:{channel}", ts, source, power_w, energy_kwh,
                voltage_v=volts, device_ts=device_ts)
        for channel, (power_w, energy_kwh) in channels.items()
    ))
