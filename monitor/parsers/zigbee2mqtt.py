"""Zigbee2MQTT: the JSON state of ``<base>/<friendly name>``.

The friendly name may contain slashes, so the topic alone cannot tell a device
``<base>/hall/plug`` from the attribute topic ``<base>/hall/power``: the payload
decides.  A JSON object is a device state; a bare value under a topic with a
slash in the name part is an attribute topic (``output: attribute_and_json``)
and is ignored, because the JSON state carries the same values.

Keys (kWh and W, as Zigbee2MQTT exposes them): ``power`` W, ``energy`` kWh,
``voltage`` V, ``current`` A.  Channel keys ``power_<c>``/``energy_<c>`` (with
``voltage_<c>``/``current_<c>``), where ``<c>`` is ``l1``, ``l2``, ... , a
single letter (``a``, ``b``), a number, ``left`` or ``right``, give channel
readings ``zigbee2mqtt/<name>:<c>``.  Which meter a device is:

1. a plain ``energy`` key: one meter ``zigbee2mqtt/<name>`` (``power`` and
   ``energy``); channel keys are not emitted, they would count twice;
2. else channel keys: one meter per channel; a plain ``power`` is ignored (it is
   the sum of the channels);
3. else a plain ``power``: one meter ``zigbee2mqtt/<name>``;
4. else not a meter (a bulb, a sensor): ignored.

``null`` values mean "not reported yet" and count as absent.  Keys such as
``power_factor`` or ``power_on_behavior`` are not channels.  ``last_seen``
(ISO 8601 with an offset, or epoch milliseconds) is the reading's time when
present, else the receipt time.  An empty payload (Zigbee2MQTT clears the
retained state of a removed or renamed device that way) is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.model import ParseError, ParseResult, Reading, TsSource
from monitor.parsers.common import (
    IGNORED,
    aux,
    check_options,
    decode,
    epoch,
    kind,
    load_json,
    measurement,
    online,
    rfc3339,
    stamp,
)

_NAMED_CHANNELS = frozenset({"left", "right"})


class Zigbee2MqttParser:
    """Parser for ``format = "zigbee2mqtt"``.  Option ``base_topic`` (default ``zigbee2mqtt``)."""

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
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
            return IGNORED
        name, sep, last = rest.rpartition("/")
        if sep and name:
            if last == "availability":
                return _availability(name, payload)
            if last in ("set", "get") or "/set/" in rest or "/get/" in rest:
                return IGNORED
        if not payload.strip():
            return IGNORED  # an empty retained message clears a removed/renamed device
        doc = load_json(payload) if not sep else _maybe_json(payload)
        if not isinstance(doc, dict):
            if sep:
                return IGNORED  # <base>/<name>/<attribute> with a bare value
            raise ParseError("wrong_type", f"state of {rest!r} is {kind(doc)}, expected an object")
        return _state("zigbee2mqtt/" + rest, doc, received_at)


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


def _state(device: str, doc: Mapping[str, object], received_at: float) -> ParseResult:
    device_ts = _last_seen(doc.get("last_seen"))
    ts, source = stamp(device_ts, received_at)
    energy = doc.get("energy")
    if energy is not None:
        return _single(device, doc, energy, ts=ts, source=source, device_ts=device_ts)

    channels: dict[str, list[object]] = {}  # suffix -> [power, energy]
    for key, value in doc.items():
        if value is None:
            continue
        if key.startswith("power_"):
            slot = 0
        elif key.startswith("energy_"):
            slot = 1
        else:
            continue
        suffix = key[7 if slot else 6:]
        if suffix and _is_channel(suffix):
            channels.setdefault(suffix, [None, None])[slot] = value
    if channels:
        readings = []
        for suffix, (power, energy_c) in channels.items():
            readings.append(Reading(
                f"{device}:{suffix}", ts, source,
                None if power is None else measurement(power, "power_" + suffix),
                None if energy_c is None else measurement(energy_c, "energy_" + suffix),
                voltage_v=aux(doc.get("voltage_" + suffix)),
                current_a=aux(doc.get("current_" + suffix)),
                device_ts=device_ts,
            ))
        return ParseResult(readings=tuple(readings))
    if doc.get("power") is not None:
        return _single(device, doc, None, ts=ts, source=source, device_ts=device_ts)
    return IGNORED


def _single(
    device: str,
    doc: Mapping[str, object],
    energy: object,
    *,
    ts: float,
    source: TsSource,
    device_ts: float | None,
) -> ParseResult:
    power = doc.get("power")
    return ParseResult(readings=(Reading(
        device, ts, source,
        None if power is None else measurement(power, "power"),
        None if energy is None else measurement(energy, "energy"),
        voltage_v=aux(doc.get("voltage")),
        current_a=aux(doc.get("current")),
        device_ts=device_ts,
    ),))


def _last_seen(raw: object) -> float | None:
    if isinstance(raw, str):
        return rfc3339(raw)
    return epoch(raw)
