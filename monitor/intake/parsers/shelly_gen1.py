"""Shelly Gen1: one plain decimal per topic under ``shellies/<id>/``.

Read (channel ``<n>`` as the device numbers it, from 0):

* ``relay|roller|light/<n>/power``: W (signed).
* ``relay|roller|light/<n>/energy``: watt-minutes since boot -> kWh (/ 60 000),
  :attr:`EnergyScope.SINCE_BOOT`.
* ``emeter/<n>/power``: W, signed (negative while the channel returns energy).
* ``emeter/<n>/total``: Wh kept in non-volatile memory -> kWh (/ 1000), lifetime.
* ``emeter/<n>/total_returned``: exported Wh (non-volatile) -> ``export_kwh``.
* ``online``: ``true``/``false`` -> availability of ``shelly/<id>`` (all channels).

``<id>`` is everything between ``shellies/`` and the known sub-topic, so a
custom MQTT id with slashes (``shellies/hall-a/rack7/relay/0/power``) gives
``shelly/hall-a/rack7:0``.  The emeter's ``energy`` and ``returned_energy``
(watt-minutes since boot) are skipped (``duplicate_counter``): two different
counters under one channel would look like counter resets.  ``reactive_power``,
``voltage``, ``current`` and ``pf`` are ignored with their reasons.  Gen2
devices whose topic prefix is ``shellies/<id>`` (``.../events/rpc``,
``.../status/<component>``) are read by the Gen2 parser, so one ``shellies/#``
source reads both generations.  Gen1 sends no timestamp: readings are
stamped on receipt.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.core.model import EnergyScope, ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    check_options,
    ignored,
    kwh_from_wh,
    kwh_from_wmin,
    online,
    text_measurement,
    text_power,
)
from monitor.intake.parsers.shelly_gen2 import ShellyGen2Parser

_OUTPUTS = frozenset({"relay", "roller", "light"})
_METERED = _OUTPUTS | {"emeter"}
#: <output|emeter>/<n>/<metric> metrics that are not read, and why.
_METRICS = {
    "command": "command", "pos": "not_energy_topic", "status": "not_energy_topic",
    "overpower_value": "not_energy_value", "reactive_power": "reactive_power",
    "voltage": "not_energy_value", "current": "not_energy_value", "pf": "not_energy_value",
    "returned_energy": "duplicate_counter", "set": "command",
}
# Other Gen1 sub-topics: device state, inputs, sensors.  Recognised, not read.
_KNOWN = frozenset({
    "announce", "info", "status", "command", "input", "input_event", "longpush",
    "temperature", "temperature_f", "overtemperature", "temperature_status",
    "overpower", "overpower_value", "voltage", "sensor", "ext_temperature",
    "ext_temperature_f", "ext_humidity", "ext_switch", "color", "white", "adc",
    "loaderror", "heartbeat", "firmware",
})
#: Gen2 ``status/<name>`` components without an id (with an id they contain ":").
_GEN2_STATUS = frozenset({"sys", "wifi", "cloud", "mqtt", "ble", "eth", "ws", "ui", "knx"})


class ShellyGen1Parser:
    """Parser for ``format = "shelly_gen1"``.  No options; Gen2 topics go to a Gen2 parser."""

    def __init__(
        self, options: Mapping[str, object] | None = None, registry: object = None,
        topic_filter: str | None = None,
    ) -> None:
        check_options("shelly_gen1", options, ())
        self._gen2 = ShellyGen2Parser()

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        segs = topic.split("/")
        n = len(segs)
        if segs[0] != "shellies" or n < 2 or not segs[1]:
            raise ParseError("unknown_topic", f"{topic!r} is not under shellies/<id>/")
        if n == 2:
            if segs[1] in ("announce", "command"):  # broadcast topics, not a device
                return ignored("announce" if segs[1] == "announce" else "command")
            raise ParseError("unknown_topic", topic)
        # Gen2 devices with the prefix shellies/<id>
        if n >= 4 and segs[-2:] == ["events", "rpc"]:
            return self._gen2.parse(topic, payload, received_at, retained)
        if n >= 4 and segs[-2] == "status" and (":" in segs[-1] or segs[-1] in _GEN2_STATUS):
            return self._gen2.parse(topic, payload, received_at, retained)
        if n >= 3 and segs[-1] == "rpc":
            return ignored("command")
        # <id>/<output|emeter>/<n>/<metric>
        if n >= 5 and segs[-3] in _METERED and segs[-2].isdigit() and _all(segs[1:-3]):
            return _metric(
                "shelly/" + "/".join(segs[1:-3]), segs[-3], segs[-2], segs[-1], topic,
                payload, received_at,
            )
        # <id>/<output|emeter>/<n>: on/off state of a relay
        if n >= 4 and segs[-2] in _METERED and segs[-1].isdigit() and _all(segs[1:-2]):
            return ignored("state_without_energy")
        if segs[-1] == "online" and _all(segs[1:-1]):
            return online(payload, "shelly/" + "/".join(segs[1:-1]))
        for i in range(n - 1, 1, -1):
            if segs[i] in _KNOWN or segs[i] in _METERED:
                if segs[i] in ("announce", "info"):
                    return ignored("announce")
                if segs[i] == "command":
                    return ignored("command")
                if segs[i] in _METERED:
                    raise ParseError("unknown_topic", f"{topic!r}: channel is not a number")
                return ignored("not_energy_topic")
        raise ParseError("unknown_topic", f"{topic!r} is not a Shelly Gen1 topic")


def _all(parts: list[str]) -> bool:
    return bool(parts) and all(parts)


def _metric(
    device: str, head: str, n: str, metric: str, topic: str, payload: bytes, received_at: float
) -> ParseResult:
    channel = f"{device}:{n}"
    if metric == "power":
        return _reading(channel, received_at, power_w=text_power(payload, topic))
    if head == "emeter":
        if metric == "total":
            kwh = kwh_from_wh(text_measurement(payload, topic))
            return _reading(channel, received_at, energy_kwh=kwh)
        if metric == "total_returned":
            kwh = kwh_from_wh(text_measurement(payload, topic))
            return _reading(channel, received_at, export_kwh=kwh)
        if metric == "energy":
            return ignored("duplicate_counter")  # Wmin since boot; total is read
    elif metric == "energy":
        kwh = kwh_from_wmin(text_measurement(payload, topic))
        return _reading(channel, received_at, energy_kwh=kwh, scope=EnergyScope.SINCE_BOOT)
    return ignored(_METRICS.get(metric, "not_energy_topic"))


def _reading(
    device: str,
    received_at: float,
    *,
    power_w: float | None = None,
    energy_kwh: float | None = None,
    export_kwh: float | None = None,
    scope: EnergyScope = EnergyScope.LIFETIME,
) -> ParseResult:
    return ParseResult(readings=(
        Reading(device, received_at, TsSource.RECEIVED, power_w, energy_kwh, scope,
                export_kwh=export_kwh),
    ))
