"""Values that flow between the modules: readings, parse results, dead letters.

Everything here is an immutable value; no module-level state.  Units are in the
names: ``power_w`` in watts, ``energy_kwh`` in kilowatt-hours, ``ts`` in Unix
seconds (UTC, float).

What the values mean (the ledger depends on it):

* ``energy_kwh`` is the *imported active* energy counter only.  Exported
  energy is ``export_kwh``; reactive (kvarh) and apparent (kVAh) energy, daily
  and yesterday totals and sums of phases are never consumption and are never
  put in a :class:`Reading` (a parser skips them with a counted reason).
* ``power_w`` is signed net active power: negative means the channel produces
  (exports).  Production never counts as load.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TsSource(enum.StrEnum):
    """Where a reading's time came from."""

    DEVICE = "device"  # the payload carried a trustworthy timestamp
    RECEIVED = "received"  # stamped on receipt (no device time, or an untrusted one)


class EnergyScope(enum.StrEnum):
    """What a cumulative energy counter counts since."""

    LIFETIME = "lifetime"  # never resets except by hand (Tasmota Total, Gen2 aenergy.total)
    SINCE_BOOT = "since_boot"  # resets on reboot (Shelly Gen1 relay `energy` in Wmin)
    DAILY = "daily"  # resets at the device's local midnight (ESPHome total_daily_energy)


@dataclass(frozen=True, slots=True)
class Reading:
    """One normalised measurement of one meter channel.

    ``device`` is the device id the parser derives from the topic (SPEC: e.g.
    ``tasmota/pow7``, ``shelly/shellypro3em-ab12:a``).  The meter id is resolved
    later from the ``[[meters]]`` table.  At least one of ``power_w`` and
    ``energy_kwh`` or ``export_kwh`` is set (a parser never emits a reading with none).
    """

    device: str
    ts: float
    ts_source: TsSource = TsSource.RECEIVED
    power_w: float | None = None
    energy_kwh: float | None = None
    energy_scope: EnergyScope = EnergyScope.LIFETIME
    voltage_v: float | None = None
    current_a: float | None = None
    device_ts: float | None = None  # the device's own (possibly wrong) clock, kept for audit
    seq: int | None = None
    estimated: bool = False  # power modelled by firmware, not measured
    export_kwh: float | None = None  # exported active energy counter (net metering)


@dataclass(frozen=True, slots=True)
class Availability:
    """A device's last will or online announcement (``online=False`` = offline)."""

    device: str
    online: bool


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What one MQTT message yields: readings, availability changes, or an ignored outcome.

    ``ignored`` is the reason (a short stable token, a metric label) when a
    parser recognises the whole message as carrying nothing to account (a
    Shelly ``announce``, a Tasmota ``STATE``, an export-only sensor); such a
    message is neither readings nor a dead letter, and it is counted by reason.
    ``skipped`` lists the reasons for values *inside* a message that were not
    read (an export or reactive counter beside the import one, a negative
    counter on one channel of three): they are counted too, and never cost the
    message's other values.  A result with no readings, no availability and no
    ``ignored`` reason is a parser bug; the intake dead-letters it.
    """

    readings: tuple[Reading, ...] = ()
    availability: tuple[Availability, ...] = ()
    ignored: str = ""
    skipped: tuple[str, ...] = ()


class ParseError(ValueError):
    """A payload that cannot be read.  ``reason`` is short and stable (used as a metric label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Message:
    """An MQTT message as the intake worker sees it (copied out of paho's object)."""

    topic: str
    payload: bytes
    received_at: float
    qos: int = 0
    retain: bool = False
    dup: bool = False
    mid: int = 0
    #: MQTT 5 subscription identifiers the broker delivered this copy for (mosquitto
    #: sends one copy per matching subscription); () when the broker sent none
    sub_ids: tuple[int, ...] = ()
