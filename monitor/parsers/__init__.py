"""Device parsers: ``(topic, payload, received_at) -> ParseResult``, one module per family.

``make_parser(format, options)`` builds the parser of one ``[[sources]]``
entry.  The contract every parser keeps:

* it is called from one thread only (the intake worker) and may keep
  per-device state (Shelly Gen2 merges NotifyStatus deltas);
* it is otherwise pure: no clock (``received_at`` is the time), no
  environment, no network;
* it returns readings (power in W, energy in kWh, at least one of the two),
  availability changes, or ``ParseResult(ignored=True)`` for harmless
  messages; anything unreadable raises :class:`monitor.model.ParseError`
  with a reason from :data:`REASONS`.

The formats, their topics and device ids are described for operators in
``docs/devices.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from monitor.model import ParseResult
from monitor.parsers.common import REASONS
from monitor.parsers.emonhub import EmonhubParser
from monitor.parsers.esphome import EsphomeParser
from monitor.parsers.mbmd import MbmdParser
from monitor.parsers.native import NativeParser
from monitor.parsers.shelly_gen1 import ShellyGen1Parser
from monitor.parsers.shelly_gen2 import ShellyGen2Parser
from monitor.parsers.tasmota import TasmotaParser
from monitor.parsers.zigbee2mqtt import Zigbee2MqttParser

__all__ = ["FORMATS", "REASONS", "Parser", "make_parser"]


class Parser(Protocol):
    """Reads one MQTT message of one format.  See the module docstring for the contract."""

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult: ...


_FACTORIES: dict[str, Callable[[Mapping[str, object] | None], Parser]] = {
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


def make_parser(format: str, options: Mapping[str, object] | None = None) -> Parser:
    """A new parser for ``format`` (one per ``[[sources]]`` entry).

    Raises ``ValueError`` for an unknown format or an option the format does
    not know or cannot use (e.g. ``power_unit = "MW"``), so calling it while
    checking the configuration reports these before anything connects.
    """
    factory = _FACTORIES.get(format)
    if factory is None:
        raise ValueError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")
    return factory(options)
