"""The Grafana dashboards and provisioning under deploy/grafana/.

Every InfluxQL query in the dashboards (panel targets, template variables,
annotations) is run against a real InfluxDB 1.6 loaded with lines built by the
exporter's own line builders, after substituting Grafana's macros and the
template variables the way Grafana's InfluxDB data source does, for several
selections (All, one value, several values, a meter id with a slash).  Each
query must parse and return at least one series.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.outputs.lineproto import event_line, reading_line, rule_line
from tests.tsdb import Influx1, influxdb1

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

SITE = "irk-01"
T1 = 1_790_000_000.0  # end of the test data (2026-09-21)
T0 = T1 - 6 * 3600
INTERVAL = "5m"

# meter, group, format
METERS = [
    ("rack-07", "hall-a", "tasmota"),
    ("rack-08", "hall-a", "tasmota"),
    ("shelly/pro3em-ab12:a", "hall-b", "shelly_gen2"),
    ("tasmota/pow9", "", "tasmota"),  # no [[meters]] entry: no group tag
]
EVENTS = [
    ("alert.firing", "monthly-cap", "80% of the monthly limit used: 4812.0 of 6000 kWh"),
    ("alert.resolved", "monthly-cap", "below 80% of the monthly limit again"),
    ("alert.firing", "hall-power", "hall-b draws 5.2 kW > 5 kW"),
    ("order.issued", "monthly-cap", "shutdown group:hall-a (rack-07, rack-08)"),
    ("order.confirmed", "monthly-cap", "group:hall-a below 50 W within 40 s"),
    ("order.issued", "hall-power", "limit group:hall-b to 5 kW"),
    ("order.failed", "hall-power", "group:hall-b still at 5.1 kW after 2 resends"),
    ("meter.stale", "stale-data", "shelly/pro3em-ab12:a silent for 1200 s"),
    ("meter.recovered", "stale-data", "shelly/pro3em-ab12:a reports again"),
    ("export.dead_letter", "", "1 line(s) rejected by InfluxDB; first: HTTP 400: bad"),
    ("intake.dead_letter", "", "tele/pow9/SENSOR: not JSON"),
]


def sample_lines() -> list[str]:
    """A site's 6 hours, rendered by the exporter's line builders."""
    lines: list[str] = []
    for i in range(int((T1 - T0) // 60)):
        t = T0 + i * 60
        for k, (meter, group, fmt) in enumerate(METERS):
            if meter.startswith("shelly/") and 120 <= i < 140:
                continue  # a 20-minute gap
            line = reading_line(SITE, meter, group, fmt, t + k * 0.5,
                                power_w=2000.0 + 100 * k + i % 30, energy_kwh=1000 + i * 0.034,
                                delta_kwh=0.034,
                                voltage_v=229.5 if group else None,
                                current_a=9.1 if group else None)
            assert line is not None
            lines.append(line)
    for i in range(int((T1 - T0) // 300)):
        t = T0 + i * 300
        value = 4000.0 + 12.0 * i
        state = 0 if value < 4500 else 1
        lines.append(rule_line(SITE, "monthly-cap", "site", value, 6000.0, value / 6000.0,
                               value * 1.25, state, t))
        lines.append(rule_line(SITE, "monthly-cap", "group:hall-a", value / 2, 3500.0,
                               value / 7000.0, value * 0.6, 0, t))
        kw = 4.6 + (i % 7) / 10
        lines.append(rule_line(SITE, "hall-power", "group:hall-b", kw, 5.0, kw / 5.0, None,
                               2 if kw > 5 else 0, t))
    for j, (kind, rule, message) in enumerate(EVENTS):
        lines.append(event_line(SITE, kind, rule, message, T0 + 1800 + j * 600))
    # a second site, so that the site filter has something to filter out
    lines.append(reading_line("brt-02", "m1", "x", "json", T1 - 60, power_w=1.0,
                              energy_kwh=1.0, delta_kwh=0.0) or "")
    return lines


# --------------------------------------------------------------------------- extraction


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, InfluxQL) of every panel target, template variable and annotation."""
    out: list[tuple[str, str]] = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["query"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable ${var['name']}", var["query"]))
    for ann in dashboard["annotations"]["list"]:
        if "query" in ann:
            out.append((f"annotation {ann['name']!r}", ann["query"]))
    return out


# --------------------------------------------------------------------------- substitution

ALL = None  # the "All" selection
SCENARIOS: dict[str, dict[str, list[str] | None]] = {
    "all": {"site": [SITE], "group": ALL, "meter": ALL, "rule": ALL},
    "one": {"site": [SITE], "group": ["hall-a"], "meter": ["rack-07"], "rule": ["monthly-cap"]},
    "several": {"site": [SITE], "group": ["hall-a", "hall-b"],
                "meter": ["rack-08", "shelly/pro3em-ab12:a"],
                "rule": ["monthly-cap", "hall-power"]},
    "slash": {"site": [SITE], "group": ["hall-b"], "meter": ["shelly/pro3em-ab12:a"],
              "rule": ["hall-power"]},
}


def escape_regex(value: str) -> str:
    """Grafana's escapeRegex, which its InfluxDB data source applies to multi-value and
    include-All variables inside /regex/ (note the slash)."""
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", value)


def time_filter(start_s: float, end_s: float) -> str:
    return f"time >= {int(start_s * 1000)}ms and time <= {int(end_s * 1000)}ms"


def substitute(query: str, variables: dict[str, dict[str, Any]],
               selection: dict[str, list[str] | None]) -> str:
    tf = time_filter(T0, T1 + 60)
    q = query.replace("$__timeFilter", tf).replace("$timeFilter", tf)
    q = q.replace("$__interval_ms", "300000").replace("$__interval", INTERVAL)
    q = q.replace("$interval", INTERVAL)
    for name, var in variables.items():
        values = selection.get(name, ALL)
        if values is None:
            regex = var.get("allValue") or "(" + "|".join(map(escape_regex, var["_all"])) + ")"
            plain = ",".join(var["_all"])
        elif not (var.get("multi") or var.get("includeAll")):
            regex = plain = values[0]  # single-value variables are not escaped
        else:
            escaped = [escape_regex(v) for v in values]
            regex = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
            plain = ",".join(values)
        for form in (f"${name}", f"${{{name}}}"):
            q = q.replace(f"/^{form}$/", f"/^{regex}$/")
        q = re.sub(rf"\$\{{{name}\}}|\${name}\b|\[\[{name}\]\]", plain.replace("\\", r"\\"), q)
    left = re.findall(r"\$\{?\w+|\[\[\w+\]\]", q)
    assert not left, f"unsubstituted {left} in {q}"
    return q


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influx1]:
    with influxdb1(tmp_path_factory.mktemp("influxdb1")) as db:
        db.write(sample_lines())
        yield db


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def variables_of(dashboard: dict[str, Any], influx: Influx1) -> dict[str, dict[str, Any]]:
    """Template variables by name, each with ``_all``: the values its query returns
    (for "All" without an allValue)."""
    out: dict[str, dict[str, Any]] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        values: list[str] = []
        q = substitute(var["query"], out, SCENARIOS["all"])
        for series in influx.query(q):
            values.extend(str(row[1]) for row in series["values"])
        out[var["name"]] = {**var, "_all": values}
    return out


# --------------------------------------------------------------------------- tests


def test_there_are_three_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == [
        "meter-health.json", "rules-events.json", "site-overview.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    d = load(path)
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"] for v in d["templating"]["list"]}
    assert "datasource" in names
    for panel in panels(d):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "influxdb", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["rawQuery"] is True and target["datasource"] == panel["datasource"]
    for where, q in queries(d):
        used = set(re.findall(r"\$\{?([A-Za-z]\w*)", q)) - {"timeFilter", "interval"}
        assert used <= names, f"{where} uses undefined variables {used - names}"
        # "group" is an InfluxQL keyword: the tag must always be quoted
        assert not re.search(r'(?<!")\bgroup\b(?!")\s*(=~|=|,|\))', q, re.IGNORECASE), where


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_returns_data(influx: Influx1, path: Path, scenario: str) -> None:
    d = load(path)
    variables = variables_of(d, influx)
    found = queries(d)
    assert len(found) >= 8
    problems: list[str] = []
    for where, query in found:
        q = substitute(query, variables, SCENARIOS[scenario])
        try:
            series = influx.query(q)
        except RuntimeError as exc:
            problems.append(f"{where}: {exc}\n    {q}")
            continue
        rows = sum(len(s.get("values", [])) for s in series)
        if not rows:
            problems.append(f"{where}: no data\n    {q}")
    assert not problems, "\n".join(problems)


def test_variables_list_the_sites_meters_and_rules(influx: Influx1) -> None:
    variables = variables_of(load(GRAFANA / "dashboards" / "site-overview.json"), influx)
    assert variables["site"]["_all"] == ["brt-02", SITE]
    # group and meter follow the site selection (brt-02's m1 in group x is not listed)
    assert sorted(variables["meter"]["_all"]) == sorted(m for m, _, _ in METERS)
    assert variables["group"]["_all"] == ["hall-a", "hall-b"]
    rules = variables_of(load(GRAFANA / "dashboards" / "rules-events.json"), influx)
    assert rules["rule"]["_all"] == ["hall-power", "monthly-cap"]


def test_site_filter_and_all_include_meters_without_group(influx: Influx1) -> None:
    q = ('SELECT count("energy_delta_kwh") FROM "energy_reading" WHERE "site" =~ /^irk-01$/ '
         f'AND "group" =~ /^.*$/ AND {time_filter(T0, T1)} GROUP BY "meter"')
    assert sorted(s["tags"]["meter"] for s in influx.query(q)) == sorted(m for m, _, _ in METERS)


def test_provisioning_files() -> None:
    yaml = pytest.importorskip("yaml")
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/influxdb.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "influxdb" and source["jsonData"]["dbName"] == "energy"
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/energy-monitor.yaml").read_text())
    [provider] = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_escaping_round_trips_through_influxdb(influx: Influx1) -> None:
    """Tags and strings with separators, quotes, backslashes and newlines come back
    exactly as given (newlines in messages become spaces, by design)."""
    site, rule, scope = "esc 01,a=b", "cap, \"x\"=1", "group:hall a\\b"
    message = 'said "stop" at C:\\rack\\7,\nthen=left'
    influx.write([
        event_line(site, "alert.firing", rule, message, T1),
        rule_line(site, rule, scope, 1.5, 3, 0.5, None, 2, T1),
    ])
    [ev] = influx.query(f'SELECT "message", "rule" FROM "energy_event" WHERE "site" = '
                        f"'esc 01,a=b' AND {time_filter(T0, T1 + 1)}")
    assert ev["values"][0][1:] == [message.replace("\n", " "), rule]
    [ru] = influx.query(f'SELECT "limit", "state" FROM "energy_rule" WHERE "scope" = '
                        f"'group:hall a\\\\b' AND {time_filter(T0, T1 + 1)}")
    assert ru["values"][0][1:] == [3, 2]
