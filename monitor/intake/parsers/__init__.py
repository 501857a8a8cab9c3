"""Device parsers: ``(topic, payload, received_at) -> ParseResult``, one module per family.

``make_parser(format, options, registry, topic_filter)`` builds the parser of
one ``[[sources]]`` entry.  The contract every parser keeps:

* it is called from one thread only (the intake worker) and may keep
  per-device state (Shelly Gen2 merges NotifyStatus deltas, mbmd and ESPHome
  learn which sensors a device has);
* it is otherwise pure: no clock (``received_at`` is the time), no
  environment, no network;
* it returns readings (signed power in W, imported energy in kWh, exported
  energy in kWh, at least one of them), availability changes, or
  ``ParseResult(ignored=<reason>)`` with a reason from :data:`IGNORE_REASONS`;
  never an empty result.  Values inside a message that are not read (export
  beside import, reactive energy, a bad value on one channel) are listed in
  ``ParseResult.skipped`` and never cost the other values;
* anything unreadable as a whole raises :class:`monitor.core.model.ParseError` with
  a reason from :data:`REASONS`;
* a device id is derived from the whole variable part of the topic: two
  different devices never get one id within a source.

``registry`` is the Home Assistant discovery registry
(:class:`~monitor.intake.parsers.discovery.DiscoveryRegistry`) of the daemon; esphome
and zigbee2mqtt let its declarations decide units and quantities.
``topic_filter`` is the source's subscription; tasmota uses its wildcards to
know which topic segments name the device.

The formats, their topics and device ids are described for operators in
``docs/devices.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from monitor.core.model import ParseResult
from monitor.intake.parsers.common import IGNORE_REASONS, REASONS
from monitor.intake.parsers.discovery import Declaration, DiscoveryRegistry
from monitor.intake.parsers.emonhub import EmonhubParser
from monitor.intake.parsers.esphome import EsphomeParser
from monitor.intake.parsers.mbmd import MbmdParser
from monitor.intake.parsers.native import NativeParser
from monitor.intake.parsers.shelly_gen1 import ShellyGen1Parser
from monitor.intake.parsers.shelly_gen2 import ShellyGen2Parser
from monitor.intake.parsers.tasmota import TasmotaParser
from monitor.intake.parsers.zigbee2mqtt import Zigbee2MqttParser

__all__ = [
    "FORMATS", "IGNORE_REASONS", "REASONS", "Declaration", "DiscoveryRegistry", "Parser",
    "make_parser",
]


class Parser(Protocol):
    """Reads one MQTT message of one format.  See the module docstring for the contract."""

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult: ...


Factory = Callable[[Mapping[str, object] | None, DiscoveryRegistry | None, str | None], Parser]

_FACTORIES: dict[str, Factory] = {
    "json": NativeParser,
    "tasmota": TasmotaParser,
    "shelly_gen1": ShellyGen1Parser,
    "shelly_gen2": ShellyGen2Parser,
    "zigbee2mqtt": Zigbee2MqttParser,
    "esphome": EsphomeParser,
    "emonhub": EmonhubParser,
    "mbmd": MbmdParser,
}

FORMATS: tuple[str, ...] = tuple(_FACTORIES)


def make_parser(
    format: str,
    options: Mapping[str, object] | None = None,
    registry: DiscoveryRegistry | None = None,
    topic_filter: str | None = None,
) -> Parser:
    """A new parser for ``format`` (one per ``[[sources]]`` entry).

    ``registry`` and ``topic_filter`` are optional: without them the parsers
    decide by names and by the topic alone (see the module docstring).

    Raises ``ValueError`` for an unknown format or an option the format does
    not know or cannot use (e.g. ``power_unit = "MW"``), so calling it while
    checking the configuration reports these before anything connects.
    """
    factory = _FACTORIES.get(format)
    if factory is None:
        raise ValueError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")
    return factory(options, registry, topic_filter)
