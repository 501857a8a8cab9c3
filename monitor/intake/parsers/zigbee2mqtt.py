"""Zigbee2MQTT: the JSON state of ``<base>/<friendly name>``.

The friendly name may contain slashes, so the topic alone cannot tell a device
``<base>/hall/plug`` from the attribute topic ``<base>/hall/power``: the payload
decides.  A JSON object is a device state; a bare value under a topic with a
slash in the name part is an attribute topic (``output: attribute_and_json``)
and is ignored, because the JSON state carries the same values.

Keys (kWh and W, as Zigbee2MQTT exposes them; a discovery config's unit wins):
``power`` W (signed), ``energy`` kWh imported, ``produced_energy`` /
``energy_produced`` kWh exported (``export_kwh``), ``voltage`` V, ``current`` A.
Channel keys ``power_<c>``/``energy_<c>``/``energy_produced_<c>`` (with
``voltage_<c>``/``current_<c>``), where ``<c>`` is ``l1``, ``l2``, ... , a single
letter (``a``, ``b``), a number, ``left`` or ``right``, give channel readings
``zigbee2mqtt/<name>:<c>``.  ``energy_flow[_<c>]`` = ``producing`` (Tuya
bidirectional clamps report the magnitude of power and its direction apart)
makes that power negative: production is never load.  Which meter a device is:

1. a plain ``energy`` key: one meter ``zigbee2mqtt/<name>`` (``power`` and
   ``energy``); channel keys are skipped (``phase_value``), they would count
   twice;
2. else channel keys: one meter per channel; a plain ``power`` (or
   ``power_ab``) is skipped (``phase_sum``);
3. else a plain ``power``: one meter ``zigbee2mqtt/<name>``;
4. else not a meter (a bulb, a sensor): ignored (``state_without_energy``).

A bad value (a string, a negative counter) skips that value only, never the
other channels.  ``null`` values mean "not reported yet" and count as absent.
Keys such as ``power_factor`` or ``power_on_behavior`` are not channels;
``power_reactive``/``power_apparent`` are skipped with their reasons.
``last_seen`` (ISO 8601 with an offset, or epoch milliseconds) is the
reading's time when present, else the receipt time.  An empty payload
(Zigbee2MQTT clears the retained state of a removed or renamed device that
way) is ignored (``cleared``).
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.core.model import ParseError, ParseResult, Reading
from monitor.intake.parsers.common import (
    Values,
    aux,
    check_options,
    decode,
    epoch,
    ignored,
    kind,
    load_json,
    online,
    rfc3339,
    stamp,
)
from monitor.intake.parsers.discovery import DiscoveryRegistry

_NAMED_CHANNELS = frozenset({"left", "right"})
_POWER_SCALE = {"W": 1.0, "kW": 1000.0}
_ENERGY_SCALE = {"Wh": 0.001, "kWh": 1.0, "MWh": 1000.0}
_EXPORT_KEYS = ("produced_energy", "energy_produced", "exported_energy", "energy_export")
#: channel key prefixes -> slot (0 power, 1 energy, 2 export energy); longest first
_CHANNEL_KEYS = (("energy_produced_", 2), ("produced_energy_", 2), ("power_", 0),
                 ("energy_", 1))


class Zigbee2MqttParser:
    """Parser for ``format = "zigbee2mqtt"``.  Option ``base_topic`` (default ``zigbee2mqtt``)."""

    def __init__(
        self, options: Mapping[str, object] | None = None,
        registry: DiscoveryRegistry | None = None, topic_filter: str | None = None,
    ) -> None:
        self._registry = registry
        opts = check_options("zigbee2mqtt", options, ("base_topic",))
        base = opts.get("base_topic", "zigbee2mqtt")
        if not isinstance(base, str) or not base.strip("/"):
            raise ValueError("format 'zigbee2mqtt': option 'base_topic' must be a topic")
        self._prefix = base.strip("/") + "/"

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        if not topic.startswith(self._prefix):
            raise ParseError("unknown_topic", f"{topic!r} is not under {self._prefix!r}")
        rest = topic[len(self._prefix):]
        if not rest:
            raise ParseError("unknown_topic", topic)
        if rest == "bridge" or rest.startswith("bridge/"):
            return ignored("not_energy_topic")
        name, sep, last = rest.rpartition("/")
        if sep and name:
            if last == "availability":
                return _availability(name, payload)
            if last in ("set", "get") or "/set/" in rest or "/get/" in rest:
                return ignored("command")
        if not payload.strip():
            return ignored("cleared")  # an empty retained message clears a removed device
        doc = load_json(payload) if not sep else _maybe_json(payload)
        if not isinstance(doc, dict):
            if sep:
                return ignored("attribute_topic")  # <base>/<name>/<attribute>, a bare value
            raise ParseError("wrong_type", f"state of {rest!r} is {kind(doc)}, expected an object")
        return _state("zigbee2mqtt/" + rest, doc, received_at, self._scales(topic))

    def _scales(self, topic: str) -> tuple[float, float]:
        """(W per power unit, kWh per energy unit) the device's discovery config declares."""
        if self._registry is None or not len(self._registry):
            return 1.0, 1.0
        power = self._registry.lookup(topic, "power")
        energy = self._registry.lookup(topic, "energy")
        return (
            _POWER_SCALE.get(power.unit, 1.0) if power is not None else 1.0,
            _ENERGY_SCALE.get(energy.unit, 1.0) if energy is not None else 1.0,
        )


def _maybe_json(payload: bytes) -> object:
    """The JSON value of a payload, or None when it is a bare word (an attribute value)."""
    try:
        return load_json(payload)
    except ParseError as exc:
        if exc.reason == "not_json":
            return None
        raise


def _availability(name: str, payload: bytes) -> ParseResult:
    device = "zigbee2mqtt/" + name
    text = decode(payload)
    if text.startswith("{"):
        doc = load_json(payload)
        state = doc.get("state") if isinstance(doc, dict) else None
        if not isinstance(state, str):
            raise ParseError("unknown_value", f"availability payload {text[:40]!r}")
        return online(state.encode(), device)
    return online(payload, device)


def _is_channel(suffix: str) -> bool:
    if len(suffix) == 1:
        return suffix.isascii() and suffix.isalnum()
    if suffix.isdigit() or suffix in _NAMED_CHANNELS:
        return True
    return suffix[0] == "l" and suffix[1:].isdigit()


def _state(
    device: str, doc: Mapping[str, object], received_at: float, scales: tuple[float, float],
) -> ParseResult:
    device_ts = _last_seen(doc.get("last_seen"))
    ts, source = stamp(device_ts, received_at)
    vals = Values()
    w, kwh = scales
    for key, why in (("power_reactive", "reactive_power"), ("power_apparent", "apparent_power"),
                     ("energy_reactive", "reactive_energy")):
        if doc.get(key) is not None:
            vals.skip(why)

    channels: dict[str, list[object]] = {}  # suffix -> [power, energy, export]
    for key, value in doc.items():
        if value is None:
            continue
        for head, slot in _CHANNEL_KEYS:
            if key.startswith(head):
                suffix = key[len(head):]
                if suffix and _is_channel(suffix):
                    channels.setdefault(suffix, [None, None, None])[slot] = value
                break
    if doc.get("power_ab") is not None:
        vals.skip("phase_sum")

    def power(raw: object, name: str, flow: object) -> float | None:
        x = vals.power(raw, name)
        if x is None:
            return None
        x = round(x * w, 6)
        return -abs(x) if flow == "producing" else x

    def counter(raw: object, name: str) -> float | None:
        x = None if raw is None else vals.counter(raw, name)
        return None if x is None else round(x * kwh, 9)

    export_key = next((k for k in _EXPORT_KEYS if doc.get(k) is not None), None)
    energy = doc.get("energy")
    readings: list[Reading] = []
    if energy is not None or (not channels and (
            doc.get("power") is not None or export_key is not None)):
        if channels:
            vals.skip("phase_value")
        p = doc.get("power")
        pw = None if p is None else power(p, "power", doc.get("energy_flow"))
        e = counter(energy, "energy")
        x = counter(doc.get(export_key) if export_key else None, export_key or "")
        if pw is not None or e is not None or x is not None:
            readings.append(Reading(
                device, ts, source, pw, e, voltage_v=aux(doc.get("voltage")),
                current_a=aux(doc.get("current")), device_ts=device_ts, export_kwh=x,
            ))
        return vals.result(readings)
    if channels:
        if doc.get("power") is not None:
            vals.skip("phase_sum")
        for suffix, (cp, ce, cx) in channels.items():
            pw = None if cp is None else power(cp, "power_" + suffix,
                                               doc.get("energy_flow_" + suffix))
            ek = counter(ce, "energy_" + suffix)
            xk = counter(cx, "energy_produced_" + suffix)
            if pw is None and ek is None and xk is None:
                continue
            readings.append(Reading(
                f"{device}:{suffix}", ts, source, pw, ek,
                voltage_v=aux(doc.get("voltage_" + suffix)),
                current_a=aux(doc.get("current_" + suffix)),
                device_ts=device_ts, export_kwh=xk,
            ))
        return vals.result(readings)
    return vals.result(nothing="state_without_energy")


def _last_seen(raw: object) -> float | None:
    if isinstance(raw, str):
        return rfc3339(raw)
    return epoch(raw)
