"""Run every benchmark in one process, print a table, write one JSON file.

    python bench/run.py [--out bench/results.json] [--only NAME ...] [--quick]

Each benchmark runs in its own temporary directory (its brokers, daemons,
databases and VictoriaMetrics live and die there).  The JSON file holds the
machine (CPUs, memory, versions, date), every benchmark's own result dict, and
the issue's targets, each with its value, its target and whether it is met.
Targets are reported, not asserted: a missed target exits 0.  A benchmark that
crashes is recorded with its traceback and makes the run exit 1.

Benchmarks (``--only`` takes these names):

- ``drain``: 200k queued QoS 1 readings, daemon vs bare paho, at 100, 1,000 and 10,000
  meters (the curve); peak RSS at 10k meters;
- ``live``: p99 publish -> committed at 2,000 readings/s from 10,000 meters;
- ``rules``: one ``evaluate_all`` over 10k meters in 50 groups;
- ``store``: ``build_snapshot`` on a store with 10k meters and a month of data;
- ``store_year``: the same store with 330 days of daily rows (late in the year);
- ``export``: 200k readings into a real VictoriaMetrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from bench import bench_drain, bench_export, bench_live, bench_rules, bench_store  # noqa: E402

Result = dict[str, Any]


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    run: Callable[[Path, bool], Result]


def _drain(workdir: Path, quick: bool) -> Result:
    if quick:
        return bench_drain.curve(workdir, n=20_000, meters=(100, 1_000), rounds=2,
                                 rss_meters=1_000)
    return bench_drain.curve(workdir)


def _live(workdir: Path, quick: bool) -> Result:
    if quick:
        return bench_live.run(workdir, meters=1_000, rate=500, seconds=20)
    return bench_live.run(workdir)


def _rules(workdir: Path, quick: bool) -> Result:
    return bench_rules.run(repeat=5 if quick else 21)


def _store(workdir: Path, quick: bool) -> Result:
    if quick:
        return bench_store.run(workdir, meters=1_000, repeat=3)
    return bench_store.run(workdir)


def _store_year(workdir: Path, quick: bool) -> Result:
    if quick:
        return bench_store.run(workdir, meters=1_000, days=330, repeat=3)
    return bench_store.run(workdir, days=330, repeat=11)


def _export(workdir: Path, quick: bool) -> Result:
    return bench_export.run(workdir, n_readings=20_000 if quick else 200_000)


BENCHES = [
    Bench("drain", "queued QoS 1 readings drained: daemon vs bare paho, 100/1k/10k meters; "
          "peak RSS", _drain),
    Bench("live", "publish -> committed latency at a steady rate", _live),
    Bench("rules", "evaluate_all over the meters of 50 groups", _rules),
    Bench("store", "build_snapshot from SQLite, a month of daily rows", _store),
    Bench("store_year", "build_snapshot from SQLite, 330 days of daily rows", _store_year),
    Bench("export", "readings from SQLite into a real VictoriaMetrics", _export),
]
NAMES = [b.name for b in BENCHES]


# --------------------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _proc_field(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    mem_kib = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    mosquitto = _first_line(["mosquitto", "-h"])
    vm = _first_line(["victoria-metrics", "-version"])
    if vm in ("", "unknown") or vm.startswith("unavailable"):  # Debian's build prints nothing
        vm = "Debian " + _first_line(["dpkg-query", "-W", "-f=${Version}", "victoria-metrics"])
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    try:  # the numbers belong to the commit only if nothing it tracks was edited
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"],
                                capture_output=True, text=True, timeout=30, check=False)
        changed: list[str] | None = [ln[3:] for ln in status.stdout.splitlines() if ln]
    except (OSError, subprocess.TimeoutExpired):
        changed = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(mem_kib) / 2**20, 1) if mem_kib.isdigit() else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "paho_mqtt": metadata.version("paho-mqtt"),
        "mosquitto": re.sub(r"^mosquitto version\s*", "", mosquitto),
        "victoria_metrics": vm,
        "commit": commit,
        "uncommitted_changes": changed,
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }


# --------------------------------------------------------------------------- targets


def _target(name: str, what: str, value: float | None, op: str, target: float | None,
            unit: str, **context: Any) -> dict[str, Any]:
    met: bool | None = None
    if value is not None and target is not None:
        met = value >= target if op == ">=" else value <= target
    return {"name": name, "what": what, "value": value, "op": op, "target": target,
            "unit": unit, "met": met, **context}


def targets(results: dict[str, Result]) -> list[dict[str, Any]]:
    """The issue's targets, from whichever benchmarks ran (and did not crash)."""
    out: list[dict[str, Any]] = []
    drain = results.get("drain")
    points = {p["meters"]: p for p in drain["points"]} if drain is not None else {}
    for meters, target in ((1_000, 0.7), (10_000, 0.5)):
        if meters in points:
            p = points[meters]
            out.append(_target(
                f"drain.ratio_{meters}", f"bare paho drain time / daemon drain time, {meters} "
                "meters (same broker, same 200k messages, default config)",
                p["daemon_vs_bare_ratio"], ">=", target, "ratio",
                daemon_msgs_per_s=p["daemon_msgs_per_s"],
                bare_paho_msgs_per_s=p["bare_paho_msgs_per_s"],
                rounds=[r["ratio"] for r in p["per_round"]]))
    if drain is not None:
        rss = drain["rss_10k_meters"]
        out.append(_target(
            "drain.peak_rss", f"daemon peak RSS (VmHWM) with {rss['meters']} meters",
            rss["peak_rss_mib"], "<=", 150, "MiB"))
    live = results.get("live")
    if live is not None:
        out.append(_target(
            "live.p99", f"p99 publish -> committed, {live['rate_per_s']} readings/s from "
            f"{live['meters']} meters for {live['seconds']:g} s", live["p99_ms"], "<=", 250,
            "ms", p50_ms=live["p50_ms"], max_ms=live["max_ms"]))
    year = results.get("store_year")
    if year is not None:
        out.append(_target(
            "check.full_year", f"one check (build_snapshot + evaluate_all), {year['meters']} "
            f"meters, {year['days']} days of data, median", year["check_median_ms"], "<=",
            100, "ms", snapshot_ms=year["median_ms"], evaluate_ms=year["evaluate_median_ms"],
            rounds_ms=year.get("check_ms"), late_data_median_ms=year.get("late_check_median_ms")))
    rules = results.get("rules")
    store = results.get("store")
    if rules is not None:
        ctx: dict[str, Any] = {}
        if store is not None:
            ctx = {"build_snapshot_median_ms": store["median_ms"],
                   "check_median_ms": round(rules["median_ms"] + store["median_ms"], 3)}
        out.append(_target(
            "rules.evaluate_all", f"one evaluation of {rules['rules']} rules over "
            f"{rules['meters']} meters in {rules['groups']} groups, median",
            rules["median_ms"], "<=", 200, "ms", **ctx))
    export = results.get("export")
    if export is not None:
        ingest = points[max(points)]["daemon_msgs_per_s"] if points else None
        ratio = round(export["readings_per_s"] / ingest, 3) if ingest else None
        out.append(_target(
            "export.keeps_up", "export readings/s into VictoriaMetrics / daemon ingest "
            "readings/s (drain)", ratio, ">=", 1.0, "ratio",
            export_readings_per_s=export["readings_per_s"], ingest_readings_per_s=ingest,
            exactly_once=export["exactly_once"],
            **({} if ingest else {"note": "needs the drain benchmark in the same run"})))
    return out


# --------------------------------------------------------------------------- output


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:,.3f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def summary_rows(results: dict[str, Result]) -> list[tuple[str, str, Any]]:
    rows: list[tuple[str, str, Any]] = []
    if (d := results.get("drain")) is not None:
        for p in d["points"]:
            rows += [("drain", f"{p['meters']} meters: bare / daemon msgs/s",
                      f"{p['bare_paho_msgs_per_s']:,} / {p['daemon_msgs_per_s']:,}"),
                     ("drain", f"{p['meters']} meters: ratio", p["daemon_vs_bare_ratio"])]
        rows.append(("drain", f"peak RSS MiB, {d['rss_10k_meters']['meters']} meters",
                     d["rss_10k_meters"]["peak_rss_mib"]))
    if (v := results.get("live")) is not None:
        rows.append(("live", f"p99 ms at {v['rate_per_s']}/s", v["p99_ms"]))
    if (r := results.get("rules")) is not None:
        rows.append(("rules", "evaluate_all median ms", r["median_ms"]))
    for name in ("store", "store_year"):
        if (s := results.get(name)) is not None:
            rows.append((name, f"build_snapshot median ms ({s['days']} days)", s["median_ms"]))
    if (e := results.get("export")) is not None:
        rows.append(("export", "readings/s", e["readings_per_s"]))
        rows.append(("export", "exactly once", e["exactly_once"]))
    return rows


def print_table(report: dict[str, Any]) -> None:
    results = {k: v["result"] for k, v in report["benchmarks"].items() if "result" in v}
    print()
    print(f"{'benchmark':<11} {'measure':<36} {'value':>12}")
    for bench, measure, value in summary_rows(results):
        print(f"{bench:<11} {measure:<36} {_fmt(value):>12}")
    for name, entry in report["benchmarks"].items():
        if "error" in entry:
            print(f"{name:<11} {'CRASHED':<36} {entry['error'].splitlines()[-1][:40]}")
    if report["targets"]:
        print()
        print(f"{'target':<22} {'value':>10} {'':>2} {'target':>8} {'unit':<6} met")
        for t in report["targets"]:
            print(f"{t['name']:<22} {_fmt(t['value']):>10} {t['op']:>2} {_fmt(t['target']):>8} "
                  f"{t['unit']:<6} {_fmt(t['met'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json",
                   help="where to write the JSON results (default: bench/results.json)")
    p.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(NAMES)}")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes, for a smoke run (numbers not comparable)")
    args = p.parse_args(argv)

    selected = [b for b in BENCHES if not args.only or b.name in args.only]
    report: dict[str, Any] = {"quick": args.quick, "machine": machine(), "benchmarks": {}}
    load, cpus = report["machine"]["loadavg_at_start"][0], report["machine"]["nproc"]
    if load > 0.5 * cpus:
        print(f"note: load average {load} on {cpus} CPUs: something else is running; "
              "absolute numbers will be low, compare ratios", flush=True)
    started = time.perf_counter()
    results: dict[str, Result] = {}
    crashed = False
    for bench in selected:
        print(f"== {bench.name}: {bench.what}{' (quick)' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"what": bench.what}
        try:
            with tempfile.TemporaryDirectory(prefix=f"bench-{bench.name}-") as tmp:
                results[bench.name] = entry["result"] = bench.run(Path(tmp), args.quick)
        except Exception:
            crashed = True
            entry["error"] = traceback.format_exc()
            print(entry["error"], file=sys.stderr, flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["benchmarks"][bench.name] = entry
        print(f"   {'crashed' if 'error' in entry else 'done'} in {entry['seconds']} s",
              flush=True)
    report["duration_s"] = round(time.perf_counter() - started, 1)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(results)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out} ({report['duration_s']} s)")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
