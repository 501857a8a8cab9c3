"""Home Assistant MQTT discovery: what a device declares about each of its sensors.

ESPHome, Zigbee2MQTT and Tasmota publish a retained config per entity on
``<prefix>/<component>/[<node_id>/]<object_id>/config``::

    {"name": "Power", "stat_t": "rig-07/sensor/power/state", "unit_of_meas": "W",
     "dev_cla": "power", "stat_cla": "measurement"}

The :class:`DiscoveryRegistry` keeps, per ``(state_topic, key)``, the sensor's
:class:`Declaration` (device class, unit, state class, name); ``key`` is the JSON
path the ``value_template`` reads (``{{ value_json.energy }}`` -> ``energy``,
``{{ value_json['ENERGY']['Total'] }}`` -> ``ENERGY.Total``), or None for a
plain value.  Parsers that get a registry (esphome, zigbee2mqtt) let a
declaration decide the unit and the quantity, and fall back to names without one.

Keys may be abbreviated (``stat_t``, ``unit_of_meas``, ``dev_cla``, ``stat_cla``,
``val_tpl``) and may use the ``~`` base topic.  The device form
``<prefix>/device/<id>/config`` (a ``cmps`` map of components) is read too.
An empty payload removes what that config topic declared.  Called from the
intake worker only (one thread); not thread-safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from monitor.core.model import ParseError, ParseResult
from monitor.intake.parsers.common import ignored, kind, load_json

__all__ = ["Declaration", "DiscoveryRegistry", "template_key"]

_ABBREVIATIONS = {
    "stat_t": "state_topic",
    "unit_of_meas": "unit_of_measurement",
    "dev_cla": "device_class",
    "stat_cla": "state_class",
    "val_tpl": "value_template",
}
#: Components whose configs can declare a measured value; others are only acknowledged.
_MEASURING = frozenset({"sensor"})
#: value_json.a.b, value_json['a']["b"], value_json.a['b'] ... (the path ends at a filter/space)
_PATH = re.compile(
    r"value_json((?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*|\s*\[\s*(?:'[^']*'|\"[^\"]*\"|\d+)\s*\])+)"
)
_PART = re.compile(r"\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:'([^']*)'|\"([^\"]*)\"|(\d+))\s*\]")
_MAX_TEXT = 200  # longer declared strings are cut (a config is untrusted input)


@dataclass(frozen=True, slots=True)
class Declaration:
    """What a discovery config declares about one sensor (empty string = not declared)."""

    device_class: str = ""
    unit: str = ""
    state_class: str = ""
    name: str = ""


def template_key(template: str | None) -> str | None:
    """The dotted JSON path a value_template reads, or None for a plain ``value``.

    ``{{ value_json.energy | float }}`` -> ``"energy"``;
    ``{{value_json['ENERGY']['Total']}}`` -> ``"ENERGY.Total"``; ``{{ value }}`` -> None.
    A template that reads several paths (arithmetic) gives the first one.
    """
    if not template:
        return None
    match = _PATH.search(template)
    if match is None:
        return None
    parts = []
    for m in _PART.finditer(match.group(1)):
        parts.append(next(g for g in m.groups() if g is not None))
    return ".".join(parts) if parts else None


def _text(value: object) -> str:
    return value.strip()[:_MAX_TEXT] if isinstance(value, str) else ""


class DiscoveryRegistry:
    """The sensors declared by retained discovery configs, looked up by state topic."""

    def __init__(self, prefix: str = "homeassistant") -> None:
        self.prefix = prefix.strip("/")
        # (state_topic, key) -> declaration, and which config topic declared what
        self._by_state: dict[tuple[str, str | None], Declaration] = {}
        self._by_config: dict[str, list[tuple[str, str | None]]] = {}

    def __len__(self) -> int:
        return len(self._by_state)

    def lookup(self, state_topic: str, key: str | None = None) -> Declaration | None:
        """The declaration of the sensor read from ``state_topic`` (at JSON path ``key``)."""
        return self._by_state.get((state_topic, key))

    def update(self, topic: str, payload: bytes) -> ParseResult:
        """Read one config message; ``ignored="discovery_config"`` or a ParseError."""
        if self.prefix and topic.startswith(self.prefix + "/"):
            rest = topic[len(self.prefix) + 1:].split("/")
        else:
            rest = topic.split("/")[1:]
        if len(rest) not in (3, 4) or rest[-1] != "config" or not all(rest):
            raise ParseError("unknown_topic", f"{topic!r} is not <prefix>/<component>/…/config")
        component = rest[0]
        if not payload.strip():
            self._forget(topic)
            return ignored("discovery_config")
        doc = load_json(payload)
        if not isinstance(doc, dict):
            raise ParseError("wrong_type", f"discovery config is {kind(doc)}, expected an object")
        entries: list[tuple[tuple[str, str | None], Declaration]] = []
        if component == "device":
            cmps = doc.get("cmps", doc.get("components"))
            if not isinstance(cmps, dict):
                raise ParseError("missing_field", "cmps (the components of a device config)")
            base = {k: v for k, v in doc.items() if k not in ("cmps", "components")}
            for cmp in cmps.values():
                if not isinstance(cmp, dict):
                    raise ParseError("wrong_type",
                                     f"a component is {kind(cmp)}, expected an object")
                platform = cmp.get("p", cmp.get("platform"))
                if platform in _MEASURING:
                    entries.append(self._entry({**base, **cmp}))
        elif component in _MEASURING:
            entries.append(self._entry(doc))
        self._forget(topic)
        if entries:
            self._by_config[topic] = [where for where, _ in entries]
            for where, decl in entries:
                self._by_state[where] = decl
        return ignored("discovery_config")

    def _entry(self, doc: dict[str, object]) -> tuple[tuple[str, str | None], Declaration]:
        full: dict[str, object] = {}
        for k, v in doc.items():
            full[_ABBREVIATIONS.get(k, k)] = v
        base = full.get("~")
        if isinstance(base, str):
            for k, v in list(full.items()):
                if isinstance(v, str) and k.endswith("_topic"):
                    if v.startswith("~"):
                        full[k] = base + v[1:]
                    elif v.endswith("~"):
                        full[k] = v[:-1] + base
        state_topic = full.get("state_topic")
        if not isinstance(state_topic, str) or not state_topic.strip():
            raise ParseError("missing_field", "state_topic of a sensor config")
        template = full.get("value_template")
        key = template_key(template if isinstance(template, str) else None)
        decl = Declaration(
            device_class=_text(full.get("device_class")).lower(),
            unit=_text(full.get("unit_of_measurement")),
            state_class=_text(full.get("state_class")).lower(),
            name=_text(full.get("name")),
        )
        return (state_topic.strip(), key), decl

    def _forget(self, topic: str) -> None:
        for where in self._by_config.pop(topic, ()):
            self._by_state.pop(where, None)
