"""The typed configuration: TOML in, one frozen pydantic model out, or a list of errors.

Loading order (all before anything connects):

1. read the TOML file with :mod:`tomllib`;
2. merge ``include = [...]`` files (paths relative to the including file; the
   including file wins for scalar keys, arrays of tables such as ``rules`` are
   concatenated, included first);
3. expand ``${ENV_VAR}`` in every string;
4. read ``*_file`` secrets (``password_file``, ``token_file``, ``secret_file``);
5. validate with pydantic (``extra="forbid"`` everywhere, so unknown keys are errors).

Every problem is reported as ``dotted.key.path: what is wrong``; see
:class:`ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from monitor.intake.parsers import make_parser

FORMATS = (
    "json",
    "tasmota",
    "shelly_gen1",
    "shelly_gen2",
    "zigbee2mqtt",
    "esphome",
    "emonhub",
    "mbmd",
)
Format = Literal[
    "json", "tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt", "esphome", "emonhub", "mbmd"
]
ID_RE = re.compile(r"^[a-z0-9_-]+$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """The configuration is unusable.  ``problems`` holds ``key.path: message`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        #: the same lines followed by ``(FILE, line N)`` where the key is written, when known
        self.located = list(problems)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- site

#: weights of the INN check digits (order of the Federal Tax Service of Russia):
#: a 10-digit INN has one check digit, a 12-digit INN two
INN_WEIGHTS_10 = (2, 4, 10, 3, 5, 9, 4, 6, 8)
INN_WEIGHTS_11 = (7, 2, 4, 10, 3, 5, 9, 4, 6, 8)
INN_WEIGHTS_12 = (3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8)


def inn_check_digit(digits: str, weights: Sequence[int]) -> int:
    """The check digit of ``digits`` (the INN's leading digits) for ``weights``:
    the weighted sum modulo 11, then modulo 10."""
    return sum(int(d) * w for d, w in zip(digits, weights, strict=True)) % 11 % 10


def inn_problem(inn: str) -> str:
    """Why ``inn`` is not a valid Russian taxpayer number ('' when it is).

    10 digits (an organisation): the 10th is the check digit of the first nine.
    12 digits (a person or an individual entrepreneur): the 11th is the check
    digit of the first ten, the 12th of the first eleven.
    """
    if not inn.isascii() or not inn.isdigit():
        return (f"{inn!r} is not an INN: it must be digits only (10 for an organisation, "
                "12 for a person or an individual entrepreneur)")
    checks: list[tuple[int, Sequence[int]]]
    if len(inn) == 10:
        checks = [(9, INN_WEIGHTS_10)]
    elif len(inn) == 12:
        checks = [(10, INN_WEIGHTS_11), (11, INN_WEIGHTS_12)]
    else:
        return (f"{inn!r} is not an INN: it has {len(inn)} digits, an INN has 10 (an "
                "organisation) or 12 (a person or an individual entrepreneur)")
    for pos, weights in checks:
        want = inn_check_digit(inn[:pos], weights)
        if int(inn[pos]) != want:
            return (f"{inn!r} is not a valid INN: check digit {pos + 1} is {inn[pos]}, the "
                    f"INN rules give {want} for the digits before it (a typing error?)")
    return ""


class SiteConfig(_Model):
    id: str
    name: str = ""
    timezone: str = "UTC"
    region: str = ""
    subregion: str = ""
    # required: a default would silently decide which legal limits apply
    category: str
    off_grid: bool = False
    # legal particulars, printed on the compliance report; all optional
    owner: str = ""  # who holds the supply contract: an organisation or a person
    inn: str = ""  # taxpayer number (ИНН): 10 digits (organisation) or 12 (person)
    address: str = ""  # the site's postal address
    supply_contract: str = ""  # number and date of the electricity supply contract
    supply_point: str = ""  # the point of supply (точка поставки) as the contract names it

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError("must match [a-z0-9_-]+ (it is used in MQTT topics and tags)")
        return v

    @field_validator("inn", mode="before")
    @classmethod
    def _inn(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError('must be a string in quotes (an INN may begin with 0): '
                             f'inn = "{v}"')
        if isinstance(v, str) and v:
            problem = inn_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {v!r}") from exc
        return v

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


# --------------------------------------------------------------------------- mqtt


class TlsConfig(_Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip host-name check; for self-signed lab brokers only


class MqttConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = ""  # default: energy-monitor-<site.id>
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    qos: Literal[0, 1, 2] = 1
    session_expiry_s: int = Field(604800, ge=0)
    keepalive_s: int = Field(30, ge=5, le=65535)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    # Flow control: MQTT 5 Receive Maximum.  The broker never has more than this
    # many unacknowledged QoS 1 messages in flight to us, so the intake queue
    # (sized from it) never overflows and a crash re-delivers at most this many.
    receive_maximum: int = Field(4000, ge=10, le=65535)


class SourceConfig(_Model):
    topic: str
    format: Format
    # Format-specific hints, e.g. esphome units: {energy_unit = "Wh", power_unit = "kW"}
    options: dict[str, str | float | int | bool] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, str | float | int | bool],
                 info: ValidationInfo) -> dict[str, str | float | int | bool]:
        fmt = info.data.get("format")
        if fmt is not None:
            make_parser(fmt, v)  # raises ValueError naming the option
        return v

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v or "#" in v[:-1] or any(
            ("+" in part and part != "+") for part in v.split("/")
        ):
            raise ValueError(f"invalid MQTT subscription filter {v!r}")
        return v


class IntakeConfig(_Model):
    batch_size: int = Field(1000, ge=1, le=50000)
    batch_wait_ms: int = Field(50, ge=1, le=10000)
    max_payload_bytes: int = Field(65536, ge=64)
    max_gap_s: float = Field(900.0, gt=0)  # power is integrated only across gaps up to this
    expected_interval_s: float = Field(300.0, gt=0)  # default for meters' staleness
    jitter_kwh: float = Field(0.002, ge=0)  # counter drops this small are noise, not resets
    # the maximum power of a meter without rated_kw (auto-discovered ones included): a
    # counter step or a reset value above it x elapsed time is not counted
    unrated_max_kw: float = Field(1000.0, gt=0)
    # device clocks: a device time further ahead of the receipt time, or older, is
    # replaced by the receipt time (anomaly clock_ahead / clock_too_old)
    max_clock_ahead_s: float = Field(120.0, ge=0)
    max_clock_behind_s: float = Field(7 * 86400.0, gt=0)
    # devices that no [[meters]] entry names: read as their own meter (up to the limit),
    # or refused (dead letter unconfigured_device) when false
    allow_unconfigured: bool = True
    max_unconfigured_meters: int = Field(20000, ge=0)
    # Home Assistant MQTT discovery configs (retained, published by ESPHome and
    # Zigbee2MQTT) declare each sensor's class and unit; "" to ignore them
    discovery_prefix: str = "homeassistant"


ControlKind = Literal["tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt", "json"]


class ControlConfig(_Model):
    kind: ControlKind
    topic: str
    channel: int = 0  # relay / switch id for Shelly

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v or "+" in v or "#" in v:
            raise ValueError("must be a concrete topic without wildcards")
        return v


class MeterConfig(_Model):
    id: str
    device: str | list[str]  # one device id, or several that are the same physical meter
    group: str = ""
    rated_kw: float | None = Field(None, gt=0)
    control: ControlConfig | None = None
    expected_interval_s: float | None = Field(None, gt=0)
    # the meter's passport, printed on the compliance report; all optional
    serial: str = ""  # the serial number on the meter's plate
    model: str = ""  # make and model (type) of the meter
    verification_date: dt.date | None = None  # last metrological verification (поверка)
    next_verification_date: dt.date | None = None  # when the next one is due

    @field_validator("serial", "model", mode="before")
    @classmethod
    def _passport_text(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise ValueError(f'must be a string in quotes (leading zeros count): "{v}"')
        return v

    @field_validator("next_verification_date")
    @classmethod
    def _next_verification(cls, v: dt.date | None, info: ValidationInfo) -> dt.date | None:
        last = info.data.get("verification_date")
        if v is not None and last is not None and v <= last:
            raise ValueError(f"must be after verification_date ({last.isoformat()}), "
                             f"not {v.isoformat()}")
        return v

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.device,) if isinstance(self.device, str) else tuple(self.device)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, list) and not v) or (isinstance(v, str) and not v):
            raise ValueError("must name at least one device id")
        return v


# --------------------------------------------------------------------------- meter patterns
#
# A site of hundreds of identical plugs is configured by device-id globs instead of
# one [[meters]] entry each.  Precedence: a [[meters]] entry that names the device
# wins; otherwise the first [[meter_patterns]] entry whose glob matches (in file
# order, included files first); otherwise the device is unconfigured (meter.unknown).

PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
NAMED_PLACEHOLDERS = ("device", "prefix", "name", "channel")


@functools.lru_cache(maxsize=256)
def glob_regex(glob: str) -> re.Pattern[str]:
    """The regex of a device-id glob: ``*`` any run of characters (``/`` included),
    ``?`` one character, ``[abc]``/``[!abc]`` one of a set; each ``*`` and ``?`` is a
    numbered group (``{1}``, ``{2}``... in templates)."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if ch == "*":
            out.append("(.*?)")
        elif ch == "?":
            out.append("(.)")
        elif ch == "[" and glob.find("]", i + 2) > 0:
            end = glob.find("]", i + 2)
            body = glob[i + 1:end]
            neg = body.startswith("!")
            body = (body[1:] if neg else body).replace("\\", "\\\\").replace("^", "\\^")
            out.append(f"[{'^' if neg else ''}{body.replace('[', chr(92) + '[')}]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _wildcards(glob: str) -> int:
    return glob_regex(glob).groups


def _check_template(template: str, glob: str) -> str:
    for name in PLACEHOLDER_RE.findall(template):
        if name in NAMED_PLACEHOLDERS:
            continue
        if name.isdigit() and 1 <= int(name) <= _wildcards(glob):
            continue
        n = _wildcards(glob)
        numbered = ("" if not n else ", or {1} (what the * or ? of device matched)" if n == 1
                    else f", or {{1}}..{{{n}}} (one per * or ? of device)")
        raise ValueError(f"unknown placeholder {{{name}}}: use {{device}}, {{prefix}}, "
                         f"{{name}}, {{channel}}{numbered}")
    return template


def device_fields(device: str) -> dict[str, str]:
    """The named placeholders of a device id: ``tasmota/rig-07`` gives prefix
    ``tasmota``, name ``rig-07``; ``shelly/plus1pm-ab:0`` name ``plus1pm-ab``, channel ``0``."""
    prefix, sep, rest = device.partition("/")
    if not sep:
        prefix, rest = "", device
    base, colon, channel = rest.rpartition(":")
    if not colon:
        base, channel = rest, ""
    return {"device": device, "prefix": prefix, "name": base, "channel": channel}


def fill_template(template: str, fields: Mapping[str, str]) -> str:
    return PLACEHOLDER_RE.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


class ControlTemplate(_Model):
    """A ``control`` whose topic is a template, e.g. ``cmnd/{name}/POWER``."""

    kind: ControlKind
    topic: str
    channel: int | None = None  # None: the device id's :channel when it is a number, else 0


class MeterPattern(_Model):
    device: str  # a glob over device ids, e.g. "tasmota/rig-*"
    id: str = "{device}"  # template of the meter id
    group: str = ""  # may be a template too, e.g. "hall-{1}"
    rated_kw: float | None = Field(None, gt=0)
    control: ControlTemplate | None = None
    expected_interval_s: float | None = Field(None, gt=0)

    @field_validator("device")
    @classmethod
    def _glob(cls, v: str) -> str:
        if not v:
            raise ValueError("must be a device-id glob such as 'tasmota/rig-*'")
        glob_regex(v)
        return v

    @field_validator("id", "group")
    @classmethod
    def _templates(cls, v: str, info: ValidationInfo) -> str:
        glob = info.data.get("device")
        if glob is None:
            return v
        if info.field_name == "id" and not v:
            raise ValueError("must not be empty")
        return _check_template(v, glob)

    @model_validator(mode="after")
    def _control_topic(self) -> MeterPattern:
        if self.control is not None:
            try:
                _check_template(self.control.topic, self.device)
            except ValueError as exc:
                raise ValueError(f"control.topic: {exc}") from None
            if "+" in self.control.topic or "#" in self.control.topic:
                raise ValueError("control.topic: must be a concrete topic without wildcards")
        return self

    def fields(self, device: str) -> dict[str, str] | None:
        """The placeholders for ``device``, or None when the glob does not match it."""
        m = glob_regex(self.device).match(device)
        if m is None:
            return None
        out = device_fields(device)
        out.update({str(i + 1): g for i, g in enumerate(m.groups())})
        return out

    def meter(self, device: str) -> MeterConfig | None:
        """The meter entry this pattern gives ``device``, or None (no match, or the
        templates give an empty id or an unusable control topic)."""
        f = self.fields(device)
        if f is None:
            return None
        meter_id = fill_template(self.id, f)
        if not meter_id:
            return None
        control: ControlConfig | None = None
        if self.control is not None:
            ch = self.control.channel
            if ch is None:
                ch = int(f["channel"]) if f["channel"].isdigit() else 0
            try:
                control = ControlConfig(kind=self.control.kind, channel=ch,
                                        topic=fill_template(self.control.topic, f))
            except ValidationError:
                control = None
        return MeterConfig(id=meter_id, device=device, group=fill_template(self.group, f),
                           rated_kw=self.rated_kw, control=control,
                           expected_interval_s=self.expected_interval_s)

    def could_give(self, key: str, value: str) -> bool:
        """Whether the template ``key`` (``id`` or ``group``) can produce ``value``:
        its placeholders read as any non-empty text."""
        template = getattr(self, key)
        parts = PLACEHOLDER_RE.split(template)
        rx = "".join(re.escape(p) if i % 2 == 0 else ".+" for i, p in enumerate(parts))
        return re.fullmatch(rx, value) is not None


class MeterResolver:
    """device id -> its meter entry: the ``[[meters]]`` entry naming it, else the first
    matching ``[[meter_patterns]]`` entry (if its id is not a configured meter's or
    already another device's), else None.  Cached; one per thread."""

    def __init__(self, config: Config, cache_size: int = 200_000) -> None:
        self._configured = config.meter_for_device()
        self._patterns = config.meter_patterns
        self._config = config
        self._cache: dict[str, MeterConfig | None] = {}
        self._cache_size = cache_size
        self._claimed: dict[str, str] = {}  # pattern meter id -> the device that has it

    def get(self, device: str) -> MeterConfig | None:
        mc = self._configured.get(device)
        if mc is not None or not self._patterns:
            return mc
        if device in self._cache:
            return self._cache[device]
        mc = self._config.pattern_meter(device)
        if mc is not None and self._claimed.setdefault(mc.id, device) != device:
            mc = None  # two devices would be one meter: the second is unconfigured
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[device] = mc
        return mc

    def __contains__(self, device: object) -> bool:
        return isinstance(device, str) and self.get(device) is not None


class StorageConfig(_Model):
    path: Path = Path("/var/lib/energy-monitor/monitor.db")
    raw_retention_days: int = Field(400, ge=1)


class InfluxConfig(_Model):
    url: str
    org: str = ""
    bucket: str
    token: SecretStr | None = None
    flush_interval_s: float = Field(5.0, gt=0)
    batch_size: int = Field(5000, ge=1, le=100000)
    timeout_s: float = Field(10.0, gt=0)
    max_backlog_rows: int = Field(5_000_000, ge=1000)


class ScheduleConfig(_Model):
    check_interval_s: float = Field(60.0, gt=0)
    housekeeping_interval_s: float = Field(3600.0, gt=0)
    misfire_grace_s: float = Field(30.0, gt=0)


# --------------------------------------------------------------------------- rules

Action = Literal["alert", "shutdown", "limit"]
Period = Literal["calendar_day", "calendar_month", "calendar_year"]


class _RuleBase(_Model):
    id: str
    categories: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    subregions: list[str] = Field(default_factory=list)
    exclude_subregions: list[str] = Field(default_factory=list)
    on_warn: list[Action] = Field(default_factory=lambda: _actions("alert"))
    on_breach: list[Action] = Field(default_factory=lambda: _actions("alert"))
    effective_from: dt.date | None = None
    effective_until: dt.date | None = None  # inclusive
    repeat_s: float = Field(0.0, ge=0)  # remind of an unresolved breach this often (0 = never)
    source: str = ""  # the legal source, for reports

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError("must match [a-z0-9_-]+")
        return v


Scope = Annotated[str, Field(pattern=r"^(site|group:.+|meter:.+)$")]


def _actions(*names: Action) -> list[Action]:
    return list(names)


def _check_fractions(v: list[float]) -> list[float]:
    if any(not 0 < x < 1 for x in v):
        raise ValueError("every level must be a fraction between 0 and 1")
    return sorted(v)


class EnergyCapRule(_RuleBase):
    kind: Literal["energy_cap"]
    limit_kwh: float = Field(gt=0)
    period: Period = "calendar_month"
    scope: Scope = "site"
    warn_at: list[float] = Field(default_factory=lambda: [0.8, 0.95])
    conservative: bool = False

    _fr = field_validator("warn_at")(_check_fractions)


class PowerCapRule(_RuleBase):
    kind: Literal["power_cap"]
    limit_kw: float = Field(gt=0)
    window_s: float = Field(900.0, gt=0)
    scope: Scope = "site"
    warn_at: list[float] = Field(default_factory=lambda: [0.9])
    clear_below: float = Field(0.95, gt=0, le=1)
    hold_s: float = Field(300.0, ge=0)

    _fr = field_validator("warn_at")(_check_fractions)


class DateRange(_Model):
    from_: dt.date = Field(alias="from")
    until: dt.date  # inclusive

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _order(self) -> DateRange:
        if self.until < self.from_:
            raise ValueError("'until' is before 'from'")
        return self


MMDD_RE = re.compile(r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")


class YearlyWindow(_Model):
    start: str  # "MM-DD", inclusive
    end: str  # "MM-DD", inclusive; may be before start (crosses the new year)

    @field_validator("start", "end")
    @classmethod
    def _mmdd(cls, v: str) -> str:
        if not MMDD_RE.match(v):
            raise ValueError("must be MM-DD")
        month, day = int(v[:2]), int(v[3:])
        try:
            dt.date(2024, month, day)  # a leap year, so 02-29 is allowed
        except ValueError as exc:
            raise ValueError(f"{v} is not a day of the year") from exc
        return v


class BanWindowRule(_RuleBase):
    kind: Literal["ban_window"]
    dates: list[DateRange] = Field(default_factory=list)
    yearly: YearlyWindow | None = None
    exempt_off_grid: bool = True
    lead_time_s: float = Field(172800.0, ge=0)
    scope: Scope = "site"
    on_breach: list[Action] = Field(default_factory=lambda: _actions("alert", "shutdown"))

    @model_validator(mode="after")
    def _some_window(self) -> BanWindowRule:
        if not self.dates and self.yearly is None:
            raise ValueError("needs 'dates' or 'yearly'")
        return self


class StaleDataRule(_RuleBase):
    kind: Literal["stale_data"]
    max_silence_s: float = Field(900.0, gt=0)
    scope: Scope = "site"
    failsafe_margin: float = Field(0.0, ge=0, lt=1)  # 0 = no fail-safe breach


class CurtailmentRule(_RuleBase):
    kind: Literal["curtailment"]
    topic: str
    scope: Scope = "site"
    on_breach: list[Action] = Field(default_factory=lambda: _actions("alert", "limit"))


class ReconcileRule(_RuleBase):
    kind: Literal["reconcile"]
    main: Scope
    parts: Scope
    tolerance: float = Field(0.05, gt=0, lt=1)
    window_s: float = Field(3600.0, gt=0)

    @field_validator("on_warn", "on_breach")
    @classmethod
    def _alert_only(cls, v: list[Action]) -> list[Action]:
        # a discrepancy says the metering is wrong, not which load to stop: ordering
        # `main` off would shut the whole feed because a sub-meter is faulty
        if any(a != "alert" for a in v):
            raise ValueError("a reconcile rule can only 'alert'")
        return v


Rule = Annotated[
    EnergyCapRule | PowerCapRule | BanWindowRule | StaleDataRule | CurtailmentRule | ReconcileRule,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------- actions, outputs


class ActionsConfig(_Model):
    mode: Literal["live", "dry_run"] = "live"
    confirm_below_w: float = Field(50.0, ge=0)
    confirm_within_s: float = Field(120.0, gt=0)
    max_resends: int = Field(2, ge=0)
    auto_resume: bool = False
    shed_priority: list[str] = Field(default_factory=list)  # groups shed first
    max_orders_per_hour: int = Field(12, ge=1)  # per scope; protects relays from flapping


class WebhookConfig(_Model):
    url: str
    secret: SecretStr | None = None
    events: list[str] = Field(default_factory=lambda: ["*"])
    format: Literal["json", "slack", "telegram"] = "json"
    chat_id: str = ""  # Telegram only
    language: Literal["en", "ru"] = "en"  # of the slack/telegram texts; json is the event
    timeout_s: float = Field(10.0, gt=0)
    max_age_s: float = Field(86400.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _telegram(self) -> WebhookConfig:
        if self.format == "telegram" and not self.chat_id:
            raise ValueError("format 'telegram' needs chat_id")
        return self


class HttpConfig(_Model):
    listen: str = "127.0.0.1:9108"
    enabled: bool = True

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class Config(_Model):
    site: SiteConfig
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    meters: list[MeterConfig] = Field(default_factory=list)
    meter_patterns: list[MeterPattern] = Field(default_factory=list)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    influxdb: InfluxConfig | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    rules: list[Rule] = Field(default_factory=list)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @model_validator(mode="after")
    def _cross(self) -> Config:
        problems: list[str] = []
        seen: dict[str, int] = {}
        devices: dict[str, str] = {}
        for i, m in enumerate(self.meters):
            if m.id in seen:
                problems.append(f"meters[{i}].id: duplicate meter id {m.id!r}")
            seen[m.id] = i
            for d in m.devices:
                if d in devices:
                    problems.append(
                        f"meters[{i}].device: {d!r} is already meter {devices[d]!r}"
                    )
                devices[d] = m.id
        groups = {m.group for m in self.meters if m.group}
        rule_ids: set[str] = set()
        for i, r in enumerate(self.rules):
            if r.id in rule_ids:
                problems.append(f"rules[{i}].id: duplicate rule id {r.id!r}")
            rule_ids.add(r.id)
            scopes = [("scope", getattr(r, "scope", "site"))]
            if isinstance(r, ReconcileRule):
                scopes = [("main", r.main), ("parts", r.parts)]
            for key, scope in scopes:
                kind, _, name = scope.partition(":")
                if kind == "meter" and name not in seen and not any(
                        p.could_give("id", name) for p in self.meter_patterns):
                    problems.append(f"rules[{i}].{key}: no meter with id {name!r}")
                if kind == "group" and name not in groups and not any(
                        p.could_give("group", name) for p in self.meter_patterns):
                    problems.append(f"rules[{i}].{key}: no meter is in group {name!r}")
        if not self.sources:
            problems.append("sources: at least one [[sources]] entry is needed")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def digest(self) -> str:
        """SHA-256 of the effective configuration (secrets masked), for the audit log."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"energy-monitor-{self.site.id}"

    def meter_for_device(self) -> dict[str, MeterConfig]:
        return {d: m for m in self.meters for d in m.devices}

    def pattern_meter(self, device: str) -> MeterConfig | None:
        """The entry the first matching ``[[meter_patterns]]`` entry gives ``device``
        (None when none matches, or when its id is a ``[[meters]]`` entry's).  Does not
        look at ``[[meters]]`` devices: see :class:`MeterResolver` for the precedence."""
        for p in self.meter_patterns:
            mc = p.meter(device)
            if mc is not None:
                return None if any(m.id == mc.id for m in self.meters) else mc
        return None

    def pattern_meters(self, rows: Iterable[tuple[str, str]]) -> dict[str, MeterConfig]:
        """Of the stored meters (``(id, device)`` rows), those a ``[[meter_patterns]]``
        entry configures, by id (a pattern's meters exist once they reported)."""
        if not self.meter_patterns:
            return {}
        by_device = self.meter_for_device()
        ids = {m.id for m in self.meters}
        out: dict[str, MeterConfig] = {}
        for meter_id, device in rows:
            if meter_id in ids or device in by_device:
                continue
            mc = self.pattern_meter(device)
            if mc is not None and mc.id == meter_id:
                out[meter_id] = mc
        return out

    def meter_config(self, meter_id: str, device: str) -> MeterConfig | None:
        """The entry of a stored meter (``meters`` row id and device): its ``[[meters]]``
        entry, else the pattern entry of its device when that gives this id."""
        for m in self.meters:
            if m.id == meter_id:
                return m
        if any(device in m.devices for m in self.meters):
            return None
        mc = self.pattern_meter(device)
        return mc if mc is not None and mc.id == meter_id else None


# --------------------------------------------------------------------------- loading


SECRET_KEYS = {"password_file": "password", "token_file": "token", "secret_file": "secret"}


def default_path() -> Path:
    return Path(os.environ.get("ENERGY_MONITOR_CONFIG", "config.toml"))


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError([f"{where}: file not found: {path}"]) from exc
    except PermissionError as exc:
        raise ConfigError([f"{where}: cannot read {path}: permission denied"]) from exc
    except IsADirectoryError as exc:
        raise ConfigError([f"{where}: {path} is a directory, not a TOML file "
                           "(give the file, e.g. --config /etc/energy-monitor/config.toml)"]
                          ) from exc
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{where}: {path} is not valid TOML: not UTF-8 text"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}: {path} is not valid TOML: {exc}"]) from exc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = _merge(out[key], value)
        elif key in out and isinstance(out[key], list) and isinstance(value, list):
            out[key] = [*out[key], *value]
        else:
            out[key] = value
    return out


def _load_with_includes(path: Path, depth: int = 0,
                        origins: dict[KeyPath, Origin] | None = None) -> dict[str, Any]:
    """The merged data of ``path`` and its includes.  ``origins``, when given, is filled
    with the file and line of every key (paths as in the merged data)."""
    if depth > 8:
        raise ConfigError([f"include: nested too deep at {path} (a cycle?)"])
    data = _read_toml(path, "include" if depth else "config")
    includes = data.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        raise ConfigError([_located("include: must be a list of file paths",
                                    _file_origins(path))])
    merged: dict[str, Any] = {}
    for inc in includes:
        sub: dict[KeyPath, Origin] | None = {} if origins is not None else None
        part = _load_with_includes(path.parent / inc, depth + 1, sub)
        if origins is not None and sub is not None:
            origins.update({_shift(k, merged): v for k, v in sub.items()})
        merged = _merge(merged, part)
    if origins is not None:
        origins.update({_shift(k, merged): v for k, v in _file_origins(path).items()})
    return _merge(merged, data)


# --------------------------------------------------------------------------- error locations
#
# tomllib keeps no positions, so a light line scanner finds where each key and table
# header is written; errors then say "(FILE, line N)" after the dotted key.

KeyPath = tuple[str | int, ...]
Origin = tuple[str, int]  # file as given, 1-based line
_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                     r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _key_parts(dotted: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(
        r"""\s*("[^"]*"|'[^']*'|[^.]+)\s*(?:\.|$)""", dotted)]


def _scan_lines(text: str, file: str) -> dict[KeyPath, Origin]:
    """Where each table header and key of one TOML text is (best effort: keys inside
    multi-line arrays and strings are attributed to the enclosing key)."""
    out: dict[KeyPath, Origin] = {}
    counts: dict[KeyPath, int] = {}
    table: KeyPath = ()
    depth = 0  # open brackets/braces of a value spanning lines
    in_string = ""
    for lineno, line in enumerate(text.splitlines(), 1):
        if in_string:
            if in_string in line:
                in_string = ""
            continue
        if depth == 0:
            h = _HEADER_RE.match(line)
            if h is not None:
                parts = _key_parts(h.group(2))
                resolved: list[str | int] = []
                for name in parts:
                    resolved.append(name)
                    if tuple(resolved) in counts and name is not parts[-1]:
                        resolved.append(counts[tuple(resolved)] - 1)
                if h.group(1) == "[[":
                    key = tuple(resolved)
                    counts[key] = counts.get(key, 0) + 1
                    resolved.append(counts[key] - 1)
                table = tuple(resolved)
                out.setdefault(table, (file, lineno))
                continue
            k = _KEY_RE.match(line)
            if k is not None:
                out.setdefault((*table, *_key_parts(k.group(1))), (file, lineno))
        raw = line.split("=", 1)[-1] if depth == 0 else line
        if '"""' in raw or "'''" in raw:
            quote = '"""' if '"""' in raw else "'''"
            if raw.count(quote) % 2:
                in_string = quote
            continue
        value = re.sub(r'"(?:[^"\\]|\\.)*"' "|'[^']*'", "", raw)
        value = value.split("#", 1)[0]
        depth = max(0, depth + value.count("[") + value.count("{")
                    - value.count("]") - value.count("}"))
    return out


def _file_origins(path: Path) -> dict[KeyPath, Origin]:
    try:
        return _scan_lines(path.read_text(encoding="utf-8", errors="replace"), str(path))
    except OSError:
        return {}


def _shift(key: KeyPath, base: Mapping[str, Any]) -> KeyPath:
    """``key`` of a file merged over ``base``: indexes into an array of tables that
    ``base`` also has move past ``base``'s items (arrays are concatenated)."""
    out: list[str | int] = []
    node: Any = base
    i = 0
    while i < len(key):
        part = key[i]
        out.append(part)
        child = node.get(part) if isinstance(node, Mapping) and isinstance(part, str) else None
        if isinstance(child, list) and i + 1 < len(key) and isinstance(key[i + 1], int):
            out.append(int(key[i + 1]) + len(child))
            node, i = None, i + 2
            continue
        node, i = child, i + 1
    return tuple(out)


_PROBLEM_KEY_RE = re.compile(r"^([A-Za-z0-9_-]+(?:\[\d+\])*(?:\.[A-Za-z0-9_-]+(?:\[\d+\])*)*):")


def _located(problem: str, origins: Mapping[KeyPath, Origin]) -> str:
    """``problem`` with ``(FILE, line N)`` of its dotted key (the nearest written
    enclosing key or table), when known."""
    m = _PROBLEM_KEY_RE.match(problem)
    if m is None or not origins:
        return problem
    key: list[str | int] = []
    for name, index in re.findall(r"([A-Za-z0-9_-]+)|\[(\d+)\]", m.group(1)):
        key.append(name if name else int(index))
    while key:
        where = origins.get(tuple(key))
        if where is not None:
            return f"{problem} ({where[0]}, line {where[1]})"
        key.pop()
    return problem


def _expand(node: Any, key: str, problems: list[str], base_dir: Path,
            secrets: bool = True) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k in SECRET_KEYS and isinstance(v, str) and not secrets:
                continue  # read-only commands never need the secret itself
            if k in SECRET_KEYS and isinstance(v, str):
                target = SECRET_KEYS[k]
                if target in node:
                    problems.append(f"{sub}: give either {k} or {target}, not both")
                    continue
                secret_path = Path(_expand_env(v, sub, problems))
                if not secret_path.is_absolute():
                    secret_path = base_dir / secret_path
                try:
                    out[target] = secret_path.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    problems.append(f"{sub}: cannot read secret file {secret_path}: {exc.strerror}")
                continue
            out[k] = _expand(v, sub, problems, base_dir, secrets)
        return out
    if isinstance(node, list):
        return [_expand(v, f"{key}[{i}]", problems, base_dir, secrets)
                for i, v in enumerate(node)]
    if isinstance(node, str):
        return _expand_env(node, key, problems if secrets else [])
    return node


def _expand_env(value: str, key: str, problems: list[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            problems.append(f"{key}: environment variable {name} is not set")
            return ""
        return os.environ[name]

    return ENV_RE.sub(repl, value)


#: pydantic's names of union members in an error location: never a key (keys are snake_case)
_UNION_TAG = re.compile(r"^([A-Z]\w*|[a-z-]+\[.*\]|str|int|float|bool|none|list|dict)$")


def _loc(loc: tuple[int | str, ...], data: Any) -> str:
    """Turn a pydantic error location into ``rules[2].limit_kwh``, dropping union tags."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and item in (
            "energy_cap", "power_cap", "ban_window", "stale_data", "curtailment", "reconcile",
        ):
            continue  # discriminated-union tag, not a key the user wrote
        if (node is not None and not isinstance(node, dict)) or (
                isinstance(node, dict) and item not in node and _UNION_TAG.match(item)):
            continue  # a union member's tag (``str``, ``list[str]``, ``ControlTemplate``)
        parts.append(f".{item}" if parts else str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def parse(data: dict[str, Any], base_dir: Path = Path(), *, secrets: bool = True,
          origins: Mapping[KeyPath, Origin] | None = None) -> Config:
    """Validate already-read TOML data.  Raises :class:`ConfigError`.

    ``secrets=False`` skips ``*_file`` secrets and tolerates unset ``${ENV}``
    variables (they expand to ""), for commands that only read the store.
    ``origins`` (see :func:`load`) lets the error say which file and line.
    """
    try:
        return _parse(data, base_dir, secrets)
    except ConfigError as exc:
        exc.located = [_located(p, origins or {}) for p in exc.problems]
        raise


def _parse(data: dict[str, Any], base_dir: Path, secrets: bool) -> Config:
    problems: list[str] = []
    expanded = _expand(data, "", problems, base_dir, secrets)
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        for err in exc.errors():
            where = _loc(tuple(err["loc"]), expanded)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            for line in msg.splitlines():
                problems.append(f"{where}: {line}" if where else line)
        raise ConfigError(problems) from None


def load(path: Path | str | None = None, *, secrets: bool = True) -> Config:
    """Read, merge, expand and validate a configuration file.  Raises :class:`ConfigError`."""
    p = Path(path) if path is not None else default_path()
    origins: dict[KeyPath, Origin] = {}
    data = _load_with_includes(p, origins=origins)
    return parse(data, p.parent, secrets=secrets, origins=origins)
