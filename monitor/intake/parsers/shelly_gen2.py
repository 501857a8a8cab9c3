"""Shelly Gen2/Gen3/Plus/Pro: RPC notifications and component status over MQTT.

Topics (``<prefix>`` defaults to the device id and may contain slashes):

* ``<prefix>/events/rpc``: ``NotifyStatus`` (a *delta*), ``NotifyFullStatus``
  (everything); ``NotifyEvent`` and other methods are ignored.
* ``<prefix>/status/<component:id>``: the full status of one component.
* ``<prefix>/online``: ``true``/``false`` -> availability of ``shelly/<prefix>``.

The device base is the payload's ``src`` when present, else ``<prefix>``; a
prefix ``shellies/<id>`` (Gen2 devices set to sit beside Gen1 ones) gives
``<id>``.  Components read, as ``shelly/<base>:<channel>``:

=======================  =======  ===============  ====================  =========================
component                channel  power (W)        energy (Wh -> kWh)    export (Wh -> kWh)
=======================  =======  ===============  ====================  =========================
``switch:N``, ``pm1:N``  N        ``apower``       ``aenergy.total``     ``ret_aenergy.total``
``em:0`` (Pro 3EM)       a, b, c  ``a_act_power``  --                    --
``emdata:0``             a, b, c  --               ``a_total_act_energy``  ``a_..._ret_energy``
``em1:N``                N        ``act_power``    --                    --
``em1data:N``            N        --               ``total_act_energy``  ``total_act_ret_energy``
=======================  =======  ===============  ====================  =========================

(``em:N``/``emdata:N`` with N > 0 give channels ``a<N>``, ``b<N>``, ``c<N>``.)
Power is signed (a Pro 3EM phase that exports is negative).  The device totals
(``total_act_power``, ``total_act``, ``total_act_ret``) are skipped
(``phase_sum``): a "total" channel next to a, b, c would count twice; apparent
power is skipped too.  A bad value on one channel skips that value only.

NotifyStatus is a delta: a missing key means "unchanged".  Each delta is merged
onto the last known status of that component (kept per device base), and
readings are emitted only for the channels whose power or energy key the
message carries, with the merged values.  A message that is a dead letter as
a whole leaves the kept state untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.core.model import ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    Values,
    aux,
    check_options,
    epoch,
    ignored,
    kind,
    kwh_from_wh,
    load_json,
    online,
    stamp,
)

_MISSING: object = object()
_PHASES = ("a", "b", "c")
_COMPONENTS = frozenset({"switch", "pm1", "em", "emdata", "em1", "em1data"})

Status = dict[str, object]


class ShellyGen2Parser:
    """Parser for ``format = "shelly_gen2"``.  No options.

    Keeps the last merged status of each (device base, component) so that
    NotifyStatus deltas can be completed; call it from one thread only.
    """

    def __init__(
        self, options: Mapping[str, object] | None = None, registry: object = None,
        topic_filter: str | None = None,
    ) -> None:
        check_options("shelly_gen2", options, ())
        self._state: dict[tuple[str, str], Status] = {}

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        if topic.endswith("/events/rpc"):
            return self._rpc(topic[: -len("/events/rpc")], payload, received_at)
        if topic.endswith("/online"):
            prefix = topic[: -len("/online")]
            if prefix:
                return online(payload, "shelly/" + _base(prefix))
        head, sep, component = topic.rpartition("/")
        prefix, sep2, word = head.rpartition("/")
        if sep and sep2 and prefix:
            if word == "status":
                return self._component_status(_base(prefix), component, payload, received_at)
            if word == "command":  # <prefix>/command/<component>: requests to the device
                return ignored("command")
            if word == "debug" and component == "log":
                return ignored("not_energy_topic")
        if sep and head and component in ("rpc", "command"):
            return ignored("command")  # RPC requests / commands addressed to the device
        raise ParseError("unknown_topic", f"{topic!r} is not a Shelly Gen2 topic")

    # ------------------------------------------------------------------ messages

    def _rpc(self, prefix: str, payload: bytes, received_at: float) -> ParseResult:
        if not prefix:
            raise ParseError("unknown_topic", "events/rpc without a topic prefix")
        doc = load_json(payload)
        if not isinstance(doc, dict):
            raise ParseError("wrong_type", f"events/rpc payload is {kind(doc)}, expected an object")
        method = doc.get("method")
        if method is None:
            raise ParseError("missing_field", "method")
        if method == "NotifyStatus":
            full = False
        elif method == "NotifyFullStatus":
            full = True
        else:
            return ignored("event")  # NotifyEvent (button pushes, ...), other notifications
        src = doc.get("src", _base(prefix))
        if not isinstance(src, str) or not src:
            raise ParseError("wrong_type", f"src must be a non-empty string, got {kind(src)}")
        params = doc.get("params")
        if params is None:
            raise ParseError("missing_field", "params")
        if not isinstance(params, dict):
            raise ParseError("wrong_type", f"params is {kind(params)}, expected an object")
        device_ts = epoch(params.get("ts"))
        ts, source = stamp(device_ts, received_at)
        return self._apply(src, params, full=full, ts=ts, source=source, device_ts=device_ts)

    def _component_status(
        self, base: str, component: str, payload: bytes, received_at: float
    ) -> ParseResult:
        if component.partition(":")[0] not in _COMPONENTS:
            return ignored("not_energy_topic")  # sys, wifi, cloud, input:0, temperature:0, ...
        doc = load_json(payload)
        if not isinstance(doc, dict):
            raise ParseError("wrong_type", f"{component} status is {kind(doc)}, expected an object")
        return self._apply(
            base, {component: doc}, full=True, ts=received_at, source=TsSource.RECEIVED,
            device_ts=None,
        )

    # ------------------------------------------------------------------ merging

    def _apply(
        self,
        base: str,
        components: Mapping[str, object],
        *,
        full: bool,
        ts: float,
        source: TsSource,
        device_ts: float | None,
    ) -> ParseResult:
        vals = Values()
        readings: list[Reading] = []
        updates: dict[tuple[str, str], Status] = {}
        device = "shelly/" + base
        for key, value in components.items():
            ctype, _, cid = key.partition(":")
            if ctype not in _COMPONENTS:
                continue
            if not cid.isdigit():
                vals.bad(ParseError("wrong_type", f"component {key!r} has no numeric id"))
                continue
            if not isinstance(value, dict):
                vals.bad(ParseError("wrong_type", f"{key} is {kind(value)}, expected an object"))
                continue
            skey = (base, key)
            old = self._state.get(skey)
            merged = dict(value) if full or old is None else _merge(old, value)
            for why in _skipped(ctype, value):
                vals.skip(why)
            for channel, power, energy, export, volts, amps in _channels(
                ctype, cid, value, merged
            ):
                power_w = None if power is _MISSING else vals.power(power, f"{key} power")
                energy_kwh = None if energy is _MISSING else _wh(vals, energy, f"{key} total")
                export_kwh = None if export is _MISSING else _wh(vals, export, f"{key} returned")
                if power_w is None and energy_kwh is None and export_kwh is None:
                    continue  # nothing known yet (a delta without its base status), or bad
                readings.append(Reading(
                    f"{device}:{channel}", ts, source, power_w, energy_kwh,
                    voltage_v=aux(volts), current_a=aux(amps), device_ts=device_ts,
                    export_kwh=export_kwh,
                ))
            updates[skey] = merged
        # e.g. a delta with only "output" or "temperature"; raises when nothing is readable
        result = vals.result(readings, nothing="state_without_energy")
        self._state.update(updates)  # only for a message that is not a dead letter
        return result


def _base(prefix: str) -> str:
    """The device base of a topic prefix: ``shellies/<id>`` is ``<id>`` (Gen1-style layout)."""
    if prefix.startswith("shellies/") and len(prefix) > len("shellies/"):
        return prefix[len("shellies/"):]
    return prefix


def _wh(vals: Values, value: object, name: str) -> float | None:
    x = vals.counter(value, name)
    return None if x is None else kwh_from_wh(x)


def _skipped(ctype: str, delta: Mapping[str, object]) -> list[str]:
    """Reasons for the values of a component delta that are deliberately not read."""
    out = []
    if ctype == "em":
        if "total_act_power" in delta:
            out.append("phase_sum")
        if any(k.endswith("aprt_power") for k in delta):
            out.append("apparent_power")
    elif ctype == "emdata":
        if "total_act" in delta or "total_act_ret" in delta:
            out.append("phase_sum")
    elif ctype == "em1" and "aprt_power" in delta:
        out.append("apparent_power")
    return out


def _merge(old: Status, delta: Mapping[str, object]) -> Status:
    """``old`` with ``delta`` applied; nested objects (``aenergy``) merge key by key."""
    out = dict(old)
    for k, v in delta.items():
        prev = out.get(k)
        if isinstance(v, dict) and isinstance(prev, dict):
            out[k] = _merge(prev, v)
        else:
            out[k] = v
    return out


Channel = tuple[str, object, object, object, object, object]


def _total(obj: object) -> object:
    return obj.get("total", _MISSING) if isinstance(obj, dict) else _MISSING


def _channels(
    ctype: str, cid: str, delta: Mapping[str, object], merged: Mapping[str, object]
) -> list[Channel]:
    """(channel, power, energy, export, voltage, current) for each channel the delta touches.

    Power and the counters are ``_MISSING`` when not known even after merging.
    """
    if ctype in ("switch", "pm1"):
        if "apower" not in delta and "aenergy" not in delta and "ret_aenergy" not in delta:
            return []
        return [(cid, merged.get("apower", _MISSING), _total(merged.get("aenergy")),
                 _total(merged.get("ret_aenergy")), merged.get("voltage"), merged.get("current"))]
    if ctype == "em1":
        if "act_power" not in delta:
            return []
        return [(cid, merged["act_power"], _MISSING, _MISSING, merged.get("voltage"),
                 merged.get("current"))]
    if ctype == "em1data":
        if "total_act_energy" not in delta and "total_act_ret_energy" not in delta:
            return []
        return [(cid, _MISSING, merged.get("total_act_energy", _MISSING),
                 merged.get("total_act_ret_energy", _MISSING), None, None)]
    suffix = "" if cid == "0" else cid
    out: list[Channel] = []
    if ctype == "em":
        for ph in _PHASES:
            key = ph + "_act_power"
            if key in delta:
                out.append((ph + suffix, merged[key], _MISSING, _MISSING,
                            merged.get(ph + "_voltage"), merged.get(ph + "_current")))
    else:  # emdata
        for ph in _PHASES:
            key, ret = ph + "_total_act_energy", ph + "_total_act_ret_energy"
            if key in delta or ret in delta:
                out.append((ph + suffix, _MISSING, merged.get(key, _MISSING),
                            merged.get(ret, _MISSING), None, None))
    return out
