"""Helpers the device parsers share: payload decoding, number checks, time stamps.

Everything here is pure and cheap; it runs on the intake hot path.  Each helper
raises :class:`monitor.core.model.ParseError` with one of the tokens in
:data:`REASONS`, so the reasons a dead letter can carry are listed in one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

from monitor.core.model import Availability, ParseError, ParseResult, Reading, TsSource
from monitor.core.timefmt import parse_rfc3339

#: Every ``ParseError.reason`` a parser raises, with what it means (for docs and metrics).
#: A bad value inside a message that still yields other values is not an error: it is
#: listed in ``ParseResult.skipped`` under the same token.
REASONS: dict[str, str] = {
    "empty": "the payload (or a JSON batch) is empty",
    "not_utf8": "the payload is not valid UTF-8",
    "not_json": "the payload is not valid JSON",
    "not_a_number": "a plain-text value is not a decimal number",
    "nan": "a value is NaN, null or None (the device has no value)",
    "infinite": "a value is +/-infinity or too large for a float",
    "negative": "an energy counter is below zero (includes the -1 'unavailable' sentinel)",
    "wrong_type": "a JSON value has the wrong type (a string or boolean where a number belongs, …)",
    "missing_field": "a required key is absent",
    "no_measurement": "the message should carry power or energy but carries neither",
    "bad_timestamp": "a native-format `ts` cannot be read or is before 2000-01-01",
    "unknown_topic": "the topic does not have a shape this format publishes",
    "unknown_value": "an enumerated payload (online/offline) has an unknown value",
    "unsupported_format": "a known but unsupported variant (emonhub legacy CSV)",
    "unconfigured_meter": "a meter the format cannot read without source options (the detail "
                          "names them: Tasmota SML objects, mbmd Sum-only meters)",
    "device_id_collision": "two different topics of one source would give the same device id",
}

#: Every reason a message is ``ignored`` for, or a value inside one is ``skipped`` for
#: (beside the REASONS of a bad value), with what it means.  Stable tokens: metric labels.
IGNORE_REASONS: dict[str, str] = {
    "not_energy_topic": "a topic of the format that never carries power or energy (device "
                        "state, info, inputs, bridge, other components)",
    "command": "a command or request addressed to a device (cmnd, set/get, rpc)",
    "announce": "a device announcement or info message",
    "event": "an event notification (a button press), not a status",
    "state_without_energy": "a device state without any power or energy value (a bulb, a "
                            "switch without metering, a status delta that changes only the relay)",
    "no_energy_sensor": "a Tasmota SENSOR message without an energy object (temperature only)",
    "not_energy_value": "a value of another quantity: voltage, current, power factor, "
                        "frequency, temperature, …",
    "attribute_topic": "a Zigbee2MQTT attribute topic: the JSON state carries the same value",
    "cleared": "an empty retained payload that clears a removed or renamed device",
    "gateway_status": "a gateway's own online state (mbmd/status): it names no meter",
    "discovery_config": "a Home Assistant discovery config (read into the registry)",
    "reactive_power": "reactive power (var): not active power",
    "apparent_power": "apparent power (VA): not active power",
    "reactive_energy": "reactive energy (kvarh): never consumption",
    "apparent_energy": "apparent energy (kVAh): never consumption",
    "daily_total": "a daily, today or yesterday total (resets every day): never a counter",
    "interval_energy": "the energy of the last interval only (Tasmota Period)",
    "duplicate_counter": "a second counter of a quantity that is already read (Shelly emeter "
                         "energy beside total, ESPHome energy beside total_energy, "
                         "ImportActive beside Total)",
    "tariff_counter": "a per-tariff counter: a part of the total that is read",
    "phase_value": "a per-phase value of a device whose total is read",
    "phase_sum": "a sum of channels that are read one by one",
    "import_plus_export": "an import + export sum (mbmd Sum beside Import): not consumption",
    "directional_power": "a power of one direction only (mbmd Import/ExportPower), not "
                         "signed net power",
    "phase_pending": "a per-phase power of a meter whose other phases are not known yet",
    "sum_pending": "an mbmd Sum of a device not yet known to publish Import",
    "duplicate_power": "a second active power sensor of one meter (ESPHome SDM power beside "
                       "total_power)",
    "pulse_count": "a pulse count (emonhub pulse): it needs the meter's pulses per kWh",
    "export_power": "the power of a sensor that measures export only (reads as production)",
    "negative_counter": "an energy counter below zero on one channel (the other channels "
                        "are read)",
}


def ignored(reason: str) -> ParseResult:
    """The result of a message recognised as carrying nothing to account."""
    assert reason in IGNORE_REASONS, reason
    return ParseResult(ignored=reason)


class Values:
    """Reads the values of one message; a bad one is skipped, never fatal on its own.

    ``power`` is signed (negative = production); ``counter`` must be >= 0.  A bad
    value is recorded with its reason and None is returned, so the message's other
    channels are still read.  :meth:`result` then builds the ParseResult: readings
    with the skipped reasons, or, when nothing readable remains, the first error
    (a dead letter) or an ignored outcome for a message whose values were all
    skipped on purpose.
    """

    __slots__ = ("errors", "skipped")

    def __init__(self) -> None:
        self.skipped: list[str] = []
        self.errors: list[ParseError] = []

    def skip(self, reason: str) -> None:
        assert reason in IGNORE_REASONS or reason in REASONS, reason
        self.skipped.append(reason)

    def bad(self, exc: ParseError) -> None:
        self.errors.append(exc)
        self.skipped.append(exc.reason)

    def power(self, value: object, name: str) -> float | None:
        try:
            return number(value, name)
        except ParseError as exc:
            self.bad(exc)
            return None

    def counter(self, value: object, name: str) -> float | None:
        try:
            x = number(value, name)
        except ParseError as exc:
            self.bad(exc)
            return None
        if x < 0:
            hint = " (the 'unavailable' sentinel)" if x == -1 else ""
            self.errors.append(ParseError("negative", f"{name} is {x:g}{hint}"))
            self.skipped.append("negative_counter")
            return None
        return x

    def result(
        self, readings: Iterable[Reading] = (), availability: Iterable[Availability] = (),
        *, nothing: str = "",
    ) -> ParseResult:
        """The message's result; ``nothing`` is the ignored reason when it has no values."""
        rs, av = tuple(readings), tuple(availability)
        if rs or av:
            return ParseResult(rs, av, skipped=tuple(self.skipped))
        if self.errors:
            first = self.errors[0]
            more = f" (and {len(self.errors) - 1} more bad values)" if len(self.errors) > 1 else ""
            raise ParseError(first.reason, first.detail + more)
        if self.skipped:
            return ParseResult(ignored=self.skipped[0], skipped=tuple(self.skipped[1:]))
        if nothing:
            return ignored(nothing)
        raise ParseError("no_measurement", "the message carries no power or energy value")


#: 2000-01-01T00:00:00Z.  A device time before it means the clock was never set.
MIN_DEVICE_TS = 946_684_800.0
#: Epoch numbers at or above this are milliseconds (1e11 s is the year 5138,
#: 1e11 ms is 1973).
MS_THRESHOLD = 1e11

_isfinite = math.isfinite
_isnan = math.isnan
_NAN_WORDS = frozenset({"nan", "-nan", "+nan", "none", "null"})
_ONLINE = {"true": True, "online": True, "false": False, "offline": False}


def decode(payload: bytes) -> str:
    """The payload as stripped text; ``not_utf8`` or ``empty`` if it has none."""
    try:
        text = payload.decode()
    except UnicodeDecodeError as exc:
        raise ParseError("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    text = text.strip()
    if not text:
        raise ParseError("empty", "empty payload")
    return text


def load_json(payload: bytes) -> object:
    """``json.loads`` once, with its failures mapped to ``empty``/``not_utf8``/``not_json``."""
    text = decode(payload)
    try:
        return json.loads(text)
    except RecursionError:
        raise ParseError("not_json", "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() digit limits on huge numbers
        raise ParseError("not_json", str(exc)) from None


def kind(value: object) -> str:
    """A JSON-ish name of a value's type, for error details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def number(value: object, name: str) -> float:
    """A JSON value that must be a finite number (booleans, strings and null are refused)."""
    tp = type(value)
    if tp is float:
        x: float = value  # type: ignore[assignment]
    elif tp is int:
        try:
            x = float(value)  # type: ignore[arg-type]
        except OverflowError:
            raise ParseError("infinite", f"{name} is too large") from None
    elif value is None:
        raise ParseError("nan", f"{name} is null")
    elif isinstance(value, str):
        raise ParseError("wrong_type", f"{name} is a string ({value[:40]!r}), expected a number")
    else:
        raise ParseError("wrong_type", f"{name} is {kind(value)}, expected a number")
    if not _isfinite(x):
        if _isnan(x):
            raise ParseError("nan", f"{name} is NaN")
        raise ParseError("infinite", f"{name} is {x}")
    return x


def _non_negative(x: float, name: str) -> float:
    if x < 0:
        hint = " (the 'unavailable' sentinel)" if x == -1 else ""
        raise ParseError("negative", f"{name} is {x:g}{hint}")
    return x


def measurement(value: object, name: str) -> float:
    """A JSON energy counter: a finite number >= 0."""
    return _non_negative(number(value, name), name)


def text_number(text: str, name: str) -> float:
    """A plain-text payload that must be a finite decimal number."""
    if text.lower() in _NAN_WORDS:
        raise ParseError("nan", f"{name} is {text!r}")
    if "_" in text:  # float() would accept "1_000"; no device writes that
        raise ParseError("not_a_number", f"{name} is {text[:40]!r}")
    try:
        x = float(text)
    except ValueError:
        raise ParseError("not_a_number", f"{name} is {text[:40]!r}") from None
    if not _isfinite(x):
        raise ParseError("infinite", f"{name} is {text!r}")
    return x


def text_measurement(payload: bytes, name: str) -> float:
    """A plain-text energy counter payload: a finite decimal number >= 0."""
    return _non_negative(text_number(decode(payload), name), name)


def text_power(payload: bytes, name: str) -> float:
    """A plain-text power payload: a finite decimal number, signed (negative = production)."""
    return text_number(decode(payload), name)


def kwh_from_wh(wh: float) -> float:
    """Wh -> kWh, rounded to 1 µWh (1e-9 kWh) so that 0.06 Wh gives 6e-05, not 5.99...e-05."""
    return round(wh / 1000.0, 9)


def kwh_from_wmin(wmin: float) -> float:
    """Watt-minutes (Shelly Gen1) -> kWh (not decimal anyway, so not rounded)."""
    return wmin / 60000.0


def w_from_kw(kw: float) -> float:
    """kW -> W, rounded to 1 µW."""
    return round(kw * 1000.0, 6)


def aux(value: object) -> float | None:
    """An auxiliary value (voltage, current) of a device format, or None if unusable.

    Device formats attach voltage and current only as context; a bad one must
    not cost the energy reading it travels with, so it is dropped, not fatal.
    """
    if type(value) is float or type(value) is int:
        x = float(value)
        if _isfinite(x) and x >= 0:
            return x
    return None


def rfc3339(text: str) -> float | None:
    """Unix seconds of an ISO 8601 / RFC 3339 time *with* an offset, else None."""
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def epoch(value: object) -> float | None:
    """Unix seconds of an epoch number (milliseconds if >= 1e11), else None."""
    tp = type(value)
    if tp is not float and tp is not int:
        return None
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        return None
    return x / 1000.0 if abs(x) >= MS_THRESHOLD else x


def stamp(device_ts: float | None, received_at: float) -> tuple[float, TsSource]:
    """The time of a reading from a device format's optional clock.

    The device time when there is one and it is after 2000 (a set clock),
    otherwise the receipt time.  Device formats never fail on a bad clock.
    """
    if device_ts is not None and device_ts >= MIN_DEVICE_TS:
        return device_ts, TsSource.DEVICE
    return received_at, TsSource.RECEIVED


def online(payload: bytes, device: str) -> ParseResult:
    """An availability message: ``true``/``false``/``online``/``offline`` (any case)."""
    text = decode(payload)
    state = _ONLINE.get(text.lower())
    if state is None:
        raise ParseError("unknown_value", f"availability payload {text[:40]!r}")
    return ParseResult(availability=(Availability(device, state),))


def check_options(
    fmt: str, options: Mapping[str, object] | None, known: Iterable[str]
) -> dict[str, object]:
    """The options as a dict; ``ValueError`` naming the first key the format does not know."""
    opts = dict(options or {})
    allowed = frozenset(known)
    for key in opts:
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"format {fmt!r} has no option {key!r} (known: {names})")
    return opts


def str_option(fmt: str, opts: Mapping[str, object], key: str, default: str) -> str:
    """A non-empty string option (surrounding slashes and spaces stripped for topics)."""
    value = opts.get(key, default)
    if not isinstance(value, str) or not value.strip(" /"):
        raise ValueError(f"format {fmt!r}: option {key!r} must be a non-empty string")
    return value.strip(" /")


def names_option(fmt: str, opts: Mapping[str, object], key: str) -> frozenset[str]:
    """A comma-separated list of names (a list of strings is accepted as well)."""
    value = opts.get(key, "")
    items: Iterable[object]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValueError(f"format {fmt!r}: option {key!r} must be comma-separated names")
    out: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"format {fmt!r}: option {key!r} must be comma-separated names")
        if item.strip():
            out.add(item.strip())
    return frozenset(out)
