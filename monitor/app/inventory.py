"""Setting up a site's meters at scale: ``meters import`` and ``meters discover``.

``import`` reads an inventory (CSV with a header row) and writes ``[[meters]]``
entries as TOML, every row validated as the daemon would validate it; a bad row
is reported with its line number and nothing is written.  ``discover`` lists the
devices the store has seen that no ``[[meters]]`` entry or pattern configures:
meters read as unconfigured, and devices refused into the dead letters.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import sqlite3
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from monitor.config import Config, MeterConfig, device_fields
from monitor.core.timefmt import rfc3339_or_none

#: inventory columns for the ``control`` table
CONTROL_COLUMNS = {"control_kind": "kind", "control_topic": "topic",
                   "control_channel": "channel"}
#: a cell of column ``device`` may name several devices of one meter, separated by this
DEVICE_SEPARATOR = ";"
#: dead-letter reasons of a device that was refused because it is not configured
REFUSED_REASONS = ("unconfigured_device", "too_many_meters")
_QUOTED_RE = re.compile(r"""(['"])(.+?)\1""")


class InventoryError(Exception):
    """The inventory cannot be read at all (no header, no ``device`` column)."""


@dataclass
class Imported:
    meters: list[MeterConfig] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: column: message"


def _columns() -> set[str]:
    return (set(MeterConfig.model_fields) - {"control"}) | set(CONTROL_COLUMNS)


def read_inventory(text: str, source: str = "inventory.csv",
                   config: Config | None = None) -> Imported:
    """Every row of a CSV inventory as a validated meter entry, or a problem naming
    ``source:LINE``.  Columns are the ``[[meters]]`` keys (``device`` required, ``id``
    defaults to the device id's name part), ``control_kind``/``control_topic``/
    ``control_channel`` for the control table; an empty cell is an absent key.
    Ids and devices must be unique in the file and, with ``config``, new to it."""
    sample = text[:4096]
    try:
        dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "device" not in header:
        raise InventoryError(f"{source}: the first line must be a header naming the columns,"
                             f" with at least 'device' (found: {', '.join(header) or 'nothing'})")
    unknown = [h for h in header if h and h not in _columns()]
    if unknown:
        raise InventoryError(f"{source}:1: unknown column(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(_columns()))}")
    out = Imported()
    ids: dict[str, int] = {}
    devices: dict[str, int] = {}
    known_ids = {m.id: m for m in config.meters} if config else {}
    known_devices = config.meter_for_device() if config else {}
    for row in reader:
        line = reader.line_num
        cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(cells.values()):
            continue  # a blank line
        if None in row:
            out.problems.append(f"{source}:{line}: more cells than header columns")
            continue
        entry: dict[str, Any] = {}
        control: dict[str, Any] = {}
        for col, value in cells.items():
            if not value:
                continue
            if col in CONTROL_COLUMNS:
                control[CONTROL_COLUMNS[col]] = value
            elif col == "device" and DEVICE_SEPARATOR in value:
                entry[col] = [d.strip() for d in value.split(DEVICE_SEPARATOR) if d.strip()]
            else:
                entry[col] = value
        if control:
            entry["control"] = control
        if "id" not in entry and "device" in entry:
            first = entry["device"] if isinstance(entry["device"], str) else entry["device"][0]
            entry["id"] = device_fields(first)["name"]
        try:
            meter = MeterConfig.model_validate(entry)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                col = "control_" + loc.split(".")[1] if loc.startswith("control.") else loc
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "missing":
                    msg = "required, and empty"
                out.problems.append(f"{source}:{line}: {col}: {msg}")
            continue
        bad = False
        if meter.id in ids:
            out.problems.append(f"{source}:{line}: id: {meter.id!r} is already the meter "
                                f"of line {ids[meter.id]}")
            bad = True
        elif meter.id in known_ids:
            out.problems.append(f"{source}:{line}: id: {meter.id!r} is already a [[meters]] "
                                "entry of the configuration")
            bad = True
        for d in meter.devices:
            if d in devices:
                out.problems.append(f"{source}:{line}: device: {d!r} is already on line "
                                    f"{devices[d]}")
                bad = True
            elif d in known_devices:
                out.problems.append(f"{source}:{line}: device: {d!r} is already meter "
                                    f"{known_devices[d].id!r} of the configuration")
                bad = True
        if bad:
            continue
        ids[meter.id] = line
        devices.update(dict.fromkeys(meter.devices, line))
        out.meters.append(meter)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def to_toml(meters: Iterable[MeterConfig], header: str = "") -> str:
    """``[[meters]]`` tables of ``meters`` (keys at their defaults are left out)."""
    parts = [header] if header else []
    for m in meters:
        lines = ["[[meters]]", f"id = {_toml_value(m.id)}"]
        for key, value in m.model_dump(exclude_defaults=True, mode="python").items():
            if key == "id" or value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        parts.append("\n".join(lines) + "\n")
    text = "\n".join(parts)
    tomllib.loads(text)  # what we write must read back
    return text


def write_new(path: Path, text: str, *, force: bool = False) -> None:
    """Write ``text`` to ``path``; an existing file is an error unless ``force``
    (then it is replaced atomically, never half-written)."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; not overwritten (choose another --out, or "
                              "--force to replace it)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- discover


@dataclass(frozen=True)
class Discovered:
    device: str
    format: str  # "" when only a dead letter names it
    meter: str  # the id it is read as ("" when refused)
    first_seen: str | None
    last_seen: str | None
    refused: int  # messages kept as dead letters because it is not configured


def discover(conn: sqlite3.Connection, config: Config) -> list[Discovered]:
    """Devices the store has seen that nothing in ``config`` configures, by device id."""
    found: dict[str, dict[str, Any]] = {}
    for mid, device, fmt, first, last in conn.execute(
            "SELECT id, device, format, first_seen, last_seen FROM meters"
            " WHERE first_seen IS NOT NULL OR last_seen IS NOT NULL"):
        if config.meter_config(str(mid), str(device)) is not None:
            continue
        if device in config.meter_for_device() or config.pattern_meter(str(device)):
            continue  # configured now; the row is from before (read under its old id)
        found[str(device)] = {"format": fmt or "", "meter": str(mid), "first": first,
                              "last": last, "refused": 0}
    marks = ",".join("?" * len(REFUSED_REASONS))
    for detail, first, last, n in conn.execute(
            "SELECT detail, min(received_at), max(received_at), count(*) FROM dead_letters"
            f" WHERE reason IN ({marks}) GROUP BY detail", REFUSED_REASONS):
        device = _device_in(str(detail))
        if not device or device in config.meter_for_device() or config.pattern_meter(device):
            continue
        d = found.setdefault(device, {"format": "", "meter": "", "first": first,
                                      "last": last, "refused": 0})
        d["refused"] += int(n)
        d["first"] = min(x for x in (d["first"], first) if x is not None)
        d["last"] = max(x for x in (d["last"], last) if x is not None)
    return [Discovered(dev, d["format"], d["meter"], rfc3339_or_none(d["first"]),
                       rfc3339_or_none(d["last"]), d["refused"])
            for dev, d in sorted(found.items())]


def unread_topics(conn: sqlite3.Connection, limit: int = 50) -> list[tuple[str, int]]:
    """Topics no ``[[sources]]`` entry reads (dead letter ``unknown_topic``), most first."""
    return [(str(t), int(n)) for t, n in conn.execute(
        "SELECT topic, count(*) AS n FROM dead_letters WHERE reason = 'unknown_topic'"
        " GROUP BY topic ORDER BY n DESC, topic LIMIT ?", (limit,))]


def _device_in(detail: str) -> str:
    m = _QUOTED_RE.search(detail)
    return m.group(2) if m else ""


def skeletons(found: Sequence[Discovered]) -> list[MeterConfig]:
    """A ``[[meters]]`` entry per discovered device, to edit (group, control) and include."""
    out: list[MeterConfig] = []
    seen: set[str] = set()
    for d in found:
        mid = device_fields(d.device)["name"] or d.device
        if mid in seen:
            mid = d.device
        seen.add(mid)
        out.append(MeterConfig(id=mid, device=d.device))
    return out
