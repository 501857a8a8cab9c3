"""Rendering the report document: JSON, CSV and HTML (English or Russian).

Every function here takes the one document :func:`monitor.report.build.build_report`
made and only formats it: no figure is computed here, none is read from the
store, so every format shows the same figures under the same digest
(:func:`~monitor.report.build.content_sha256`).  The HTML comes from Jinja2
templates in ``monitor/report/templates/`` with autoescaping on: ``report.html.j2``
is the page, ``lang/<lang>.html.j2`` its words in one language, ``chart.svg.j2``
the two inline SVG charts (geometry from :mod:`monitor.report.chart`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

from monitor.core.timefmt import parse_rfc3339
from monitor.report import chart
from monitor.report.build import content_sha256

FORMATS = ("json", "csv", "html")
LANGS = ("en", "ru")
TEMPLATES = Path(__file__).resolve().parent / "templates"
# The day-by-meter table of the HTML page falls back to groups beyond this many meters.
HTML_MAX_METER_COLUMNS = 16
NBSP = "\u00a0"


# --------------------------------------------------------------------------- JSON


def to_json(report: Mapping[str, Any]) -> str:
    """The report as indented JSON (UTF-8 text), its ``sha256`` recomputed."""
    doc = {**report, "sha256": content_sha256(report)}
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- CSV


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return str(value)


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return [(prefix, value)]


def csv_sections(report: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The CSV sections as ``name -> (header, rows)``, in output order."""
    sha = content_sha256(report)
    meta: list[list[Any]] = []
    for key in ("report", "format_version", "software", "generated_at", "config_sha256",
                "site", "period", "totals"):
        meta.extend([k, v] for k, v in _flat(key, report[key]))
    meta.append(["dead_letters.count", report["dead_letters"]["count"]])
    meta.append(["anomalies.total", report["anomalies"]["total"]])
    meta.append(["orders.total", report["orders"]["total"]])
    meta.extend([k, v] for k, v in _flat("audit", report["audit"]))
    meta.append(["sha256", sha])

    ids = [m["id"] for m in report["meters"]]
    by_day: list[list[Any]] = []
    for d in report["days"]:
        by_day.append([d["day"], *(d["meters"][i] for i in ids), d["accounted_kwh"],
                       d["gap_upper_kwh"], d["conservative_kwh"]])
    by_day.append(["total", *(m["accounted_kwh"] for m in report["meters"]),
                   report["totals"]["accounted_kwh"], report["totals"]["gap_upper_kwh"],
                   report["totals"]["conservative_kwh"]])

    meter_cols = ["id", "device", "group", "rated_kw", "configured", "serial", "model",
                  "verification_date", "next_verification_date", "verified_for_period",
                  "first_seen", "last_seen",
                  "accounted_kwh", "gap_upper_kwh", "conservative_kwh", "gap_s", "gaps",
                  "gaps_without_upper_bound", "covered_s", "completeness",
                  "completeness_since_first_seen", "anomalies"]
    group_cols = ["group", "meters", "accounted_kwh", "gap_upper_kwh", "conservative_kwh"]
    rule_cols = ["id", "kind", "scope", "in_force", "not_in_force_reason", "limit", "unit",
                 "used", "used_share", "state_at_start", "measured_state", "worst_state",
                 "alerts_firing", "alerts_resolved", "source"]
    alert_cols = ["rule", "scope", "kind", "state", "severity", "at", "after_period_end",
                  "period", "value", "limit", "unit", "message"]
    order_cols = ["order_id", "issued_at", "action", "scope", "rule", "meters", "target_kw",
                  "outcome", "resends", "updated_at", "actor", "dry_run", "reason"]
    event_cols = ["at", "kind", "severity", "rule", "scope", "period", "value", "limit", "unit",
                  "message", "event_id"]
    anomaly_cols = ["at", "meter", "kind", "value", "detail", "id"]
    chart_cols = ["day", "kwh", "prorated_limit_kwh", "cumulative_kwh",
                  "cumulative_limit_kwh"]
    gap_cols = ["meter", "start", "end", "seconds_in_period", "upper_kwh_in_period", "reason",
                "id"]

    def rows(items: Iterable[Mapping[str, Any]], cols: Sequence[str]) -> list[list[Any]]:
        return [[it.get(c) for c in cols] for it in items]

    alerts = [a for r in report["rules"] for a in r["alerts"]]
    return {
        "report": (["field", "value"], meta),
        "energy_by_day_kwh": (["day", *ids, "site_accounted_kwh", "site_gap_upper_kwh",
                               "site_conservative_kwh"], by_day),
        "meters": (meter_cols, rows(report["meters"], meter_cols)),
        "chart_kwh": (chart_cols, rows(report["chart"]["days"], chart_cols)),
        "groups": (group_cols, rows(report["groups"], group_cols)),
        "rules": (rule_cols, rows(report["rules"], rule_cols)),
        "alerts": (alert_cols, rows(alerts, alert_cols)),
        "orders": (order_cols, rows(report["orders"]["items"], order_cols)),
        "events": (event_cols, rows(report["events"]["items"], event_cols)),
        "anomalies": (anomaly_cols, rows(report["anomalies"]["items"], anomaly_cols)),
        "gaps": (gap_cols, rows(report["gaps"], gap_cols)),
        "dead_letters": (["reason", "count"],
                         [[k, v] for k, v in report["dead_letters"]["by_reason"].items()]),
    }


def to_csv(report: Mapping[str, Any]) -> str:
    """Sections, each a title row ``[name]``, a header row and data rows, separated by
    an empty row.  The first is ``[report]`` (field, value); the second the
    day-by-meter table ``[energy_by_day_kwh]``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for i, (name, (header, body)) in enumerate(csv_sections(report).items()):
        if i:
            w.writerow([])
        w.writerow([f"[{name}]"])
        w.writerow(header)
        w.writerows([_cell(v) for v in row] for row in body)
    return buf.getvalue()


def parse_csv(text: str) -> dict[str, list[dict[str, str]]]:
    """Read :func:`to_csv` output back: ``section -> rows as dicts`` (all values text)."""
    out: dict[str, list[dict[str, str]]] = {}
    name: str | None = None
    header: list[str] | None = None
    for row in csv.reader(io.StringIO(text)):
        if not row:
            name = header = None
        elif name is None:
            name = row[0].strip("[]")
            out[name] = []
        elif header is None:
            header = row
        else:
            out[name].append(dict(zip(header, row, strict=True)))
    return out


# --------------------------------------------------------------------------- HTML


class Formatter:
    """How figures are written for a person in one language: the same values, with
    the language's decimal mark and digit grouping (``2,660.500`` / ``2 660,500``)."""

    def __init__(self, lang: str, tz: str) -> None:
        self.lang = lang
        self.tz = ZoneInfo(tz)

    def num(self, value: Any, digits: int = 3) -> str:
        if value is None:
            return "\u2014"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return str(value)
        text = f"{float(value):,.{digits}f}" if abs(value) < 1e15 else repr(value)
        if self.lang == "ru":
            text = text.replace(",", NBSP).replace(".", ",")
        return text

    def int(self, value: Any) -> str:
        return "\u2014" if value is None else self.num(value, 0)

    def pct(self, value: Any) -> str:
        return "\u2014" if value is None else f"{self.num(float(value) * 100, 2)}{NBSP}%"

    def when(self, iso_utc: str | None) -> str:
        """An instant in the site's zone with its offset (the JSON keeps UTC)."""
        if iso_utc is None:
            return "\u2014"
        t = dt.datetime.fromtimestamp(parse_rfc3339(iso_utc), self.tz)
        return t.strftime("%Y-%m-%d %H:%M:%S %z")

    def date(self, iso_utc: str | None) -> str:
        """The site-local date of an instant."""
        if iso_utc is None:
            return "\u2014"
        return dt.datetime.fromtimestamp(parse_rfc3339(iso_utc), self.tz).strftime("%Y-%m-%d")


@cache
def environment() -> jinja2.Environment:
    """The templates' environment: autoescaping on, undefined names are errors."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


def _day_columns(report: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    meter_ids = [m["id"] for m in report["meters"]]
    if len(meter_ids) <= HTML_MAX_METER_COLUMNS:
        return [(mid, [mid]) for mid in meter_ids]
    return [(g["group"] or "(none)", list(g["meters"])) for g in report["groups"]]


def to_html(report: Mapping[str, Any], lang: str = "en") -> str:
    """A self-contained printable page in ``lang`` (``en`` or ``ru``): inline CSS and
    SVG, no scripts, no external assets.  Raises :class:`ValueError` for another
    language."""
    if lang not in LANGS:
        raise ValueError(f"language must be one of {', '.join(LANGS)}, not {lang!r}")
    per = report["period"]
    cols = _day_columns(report)
    day_totals = {name: sum(float(m["accounted_kwh"]) for m in report["meters"]
                            if m["id"] in ids) for name, ids in cols}
    return environment().get_template("report.html.j2").render(
        r=report, lang=lang, lang_template=f"lang/{lang}.html.j2",
        f=Formatter(lang, per["timezone"]), sha=content_sha256(report),
        day_cols=cols, day_totals=day_totals,
        day_values=[[sum(float(d["meters"].get(i, 0.0)) for i in ids) for _, ids in cols]
                    for d in report["days"]],
        alerts=[a for rule in report["rules"] for a in rule["alerts"]],
        not_applied=[rule for rule in report["rules"] if not rule["in_force"]],
        daily_chart=chart.daily(report["chart"]),
        cumulative_chart=chart.cumulative(report["chart"]))


def _html_en(report: Mapping[str, Any]) -> str:
    return to_html(report, "en")


def _html_ru(report: Mapping[str, Any]) -> str:
    return to_html(report, "ru")


#: format -> renderer (HTML in English; :func:`renderer` for another language)
RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "json": to_json, "csv": to_csv, "html": _html_en}


def renderer(fmt: str, lang: str = "en") -> Callable[[Mapping[str, Any]], str]:
    """The renderer of ``fmt`` (``json``, ``csv``, ``html``) in ``lang``."""
    if fmt not in RENDERERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} or all, not {fmt!r}")
    if lang not in LANGS:
        raise ValueError(f"language must be one of {', '.join(LANGS)}, not {lang!r}")
    if fmt == "html":
        return _html_ru if lang == "ru" else _html_en
    return RENDERERS[fmt]
