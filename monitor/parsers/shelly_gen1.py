"""Shelly Gen1: one plain decimal per topic under ``shellies/<id>/``.

Read (channel ``<n>`` as the device numbers it, from 0):

* ``relay|roller|light/<n>/power``: W.
* ``relay|roller|light/<n>/energy``: watt-minutes since boot -> kWh (/ 60 000),
  :attr:`EnergyScope.SINCE_BOOT`.
* ``emeter/<n>/power``: W.
* ``emeter/<n>/total``: Wh kept in non-volatile memory -> kWh (/ 1000), lifetime.
* ``online``: ``true``/``false`` -> availability of ``shelly/<id>`` (all channels).

The emeter's ``energy`` (watt-minutes since boot) is ignored on purpose: two
different counters under one channel would look like counter resets.  So are
``returned_energy``, ``total_returned``, ``voltage``, ``current``, ``pf`` and
``reactive_power``.  Gen1 sends no timestamp: readings are stamped on receipt.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.model import EnergyScope, ParseError, ParseResult, Reading, TsSource
from monitor.parsers.common import (
    IGNORED,
    check_options,
    kwh_from_wh,
    kwh_from_wmin,
    online,
    text_measurement,
)

_OUTPUTS = frozenset({"relay", "roller", "light"})
# Other Gen1 sub-topics: device state, inputs, sensors.  Recognised, not read.
_KNOWN = frozenset({
    "announce", "info", "status", "command", "input", "input_event", "longpush",
    "temperature", "temperature_f", "overtemperature", "temperature_status",
    "overpower", "overpower_value", "voltage", "sensor", "ext_temperature",
    "ext_temperature_f", "ext_humidity", "ext_switch", "color", "white", "adc",
    "loaderror", "heartbeat", "firmware",
})


class ShellyGen1Parser:
    """Parser for ``format = "shelly_gen1"``.  Stateless; no options."""

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        check_options("shelly_gen1", options, ())

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        segs = topic.split("/")
        if segs[0] != "shellies" or len(segs) < 2 or not segs[1]:
            raise ParseError("unknown_topic", f"{topic!r} is not under shellies/<id>/")
        if len(segs) == 2:
            if segs[1] in ("announce", "command"):  # broadcast topics, not a device
                return IGNORED
            raise ParseError("unknown_topic", topic)
        device = "shelly/" + segs[1]
        head = segs[2]
        if head == "online" and len(segs) == 3:
            return online(payload, device)
        if head == "emeter" or head in _OUTPUTS:
            if len(segs) < 4 or not segs[3].isdigit():
                if len(segs) == 3:
                    return IGNORED
                raise ParseError("unknown_topic", f"{topic!r}: channel is not a number")
            if len(segs) != 5:
                return IGNORED  # relay/0 (on/off), relay/0/command, ...
            channel = f"{device}:{segs[3]}"
            metric = segs[4]
            if metric == "power":
                return _reading(channel, received_at, power_w=text_measurement(payload, topic))
            if head == "emeter":
                if metric == "total":
                    kwh = kwh_from_wh(text_measurement(payload, topic))
                    return _reading(channel, received_at, energy_kwh=kwh)
            elif metric == "energy":
                kwh = kwh_from_wmin(text_measurement(payload, topic))
                return _reading(channel, received_at, energy_kwh=kwh,
                                scope=EnergyScope.SINCE_BOOT)
            return IGNORED
        if head in _KNOWN:
            return IGNORED
        raise ParseError("unknown_topic", f"{topic!r} is not a Shelly Gen1 topic")


def _reading(
    device: str,
    received_at: float,
    *,
    power_w: float | None = None,
    energy_kwh: float | None = None,
    scope: EnergyScope = EnergyScope.LIFETIME,
) -> ParseResult:
    return ParseResult(readings=(
        Reading(device, received_at, TsSource.RECEIVED, power_w, energy_kwh, scope),
    ))
