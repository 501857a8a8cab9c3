"""Read-only HTTP: ``/healthz``, ``/metrics``, ``/api/status`` and a status page at ``/``.

The page is the template ``templates/status.html`` (Jinja2, autoescaped) over the
status document (:mod:`monitor.app.status`); see ``docs/status-page.md``.

Runs a :class:`ThreadingHTTPServer` in its own thread; every request reads the
store through a fresh connection (WAL readers never block the intake writer).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

import jinja2

from monitor.core.timefmt import parse_rfc3339
from monitor.rules.evaluate import figure, human_duration

log = logging.getLogger(__name__)


class HttpServer:
    """Serves the daemon's read-only endpoints until :meth:`close`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        health: Callable[[], list[str]],
        metrics: Callable[[], bytes],
        status: Callable[[], dict[str, Any]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "energy-monitor"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                try:
                    if path == "/healthz":
                        # SPEC: 200, or 503 with a JSON list of reasons ([] when healthy)
                        reasons = outer.health()
                        body = json.dumps(reasons).encode()
                        self._send(503 if reasons else 200, body, "application/json")
                    elif path == "/metrics":
                        self._send(200, outer.metrics(),
                                   "text/plain; version=0.0.4; charset=utf-8")
                    elif path == "/api/status":
                        body = json.dumps(outer.status(), indent=1).encode()
                        self._send(200, body, "application/json")
                    elif path == "/":
                        self._send(200, render_page(outer.status(), outer.health(), query),
                                   "text/html; charset=utf-8")
                    else:
                        self._send(404, b'{"error": "not found"}', "application/json")
                except Exception as exc:  # a broken request must not kill the server
                    log.exception("http %s failed", path)
                    self._send(500, json.dumps({"error": str(exc)}).encode(),
                               "application/json")

        self.health = health
        self.metrics = metrics
        self.status = status
        server_cls = _Server6 if ":" in host else ThreadingHTTPServer
        self.server = server_cls((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server6(ThreadingHTTPServer):
    """The same server on an IPv6 address (``listen = "[::1]:9108"``)."""

    address_family = socket.AF_INET6


PAGE_ROWS = 200  # meters per page of a group or problem listing
PROBLEM_ROWS = 20  # meters listed per problem on the summary page
SMALL_SITE = 60  # up to this many meters, the summary lists them all
REFRESH_S = 30
_STATE_ORDER = {"offline": 0, "stale": 1, "ok": 2}
_LISTS = {"stale": "Stale meters", "offline": "Offline meters",
          "unknown": "Meters not in the configuration", "all": "All meters"}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("monitor.app", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_page(status: dict[str, Any], reasons: list[str] | None = None,
                query: str = "") -> bytes:
    """The operator's page (``GET /``) from the status document: no JavaScript, no
    external asset, every value escaped by the template engine.

    ``query`` picks the view: none is the site summary (never a row per meter);
    ``group=NAME`` or ``state=stale|offline|unknown|all``, with ``page=N``, lists
    meters :data:`PAGE_ROWS` at a time.
    """
    doc = dict(status)
    problems = dict(doc.get("problems") or {})
    if reasons is not None:
        problems["health"] = list(reasons)
    doc["problems"] = problems
    tz = ZoneInfo(str(doc.get("timezone") or "UTC"))

    def local(value: object) -> str:
        if not value:
            return ""
        try:
            ts = parse_rfc3339(str(value))
        except ValueError:
            return str(value)
        return dt.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S")

    now_ts = parse_rfc3339(str(doc["now"]))
    offset = dt.datetime.fromtimestamp(now_ts, tz).strftime("%z")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    env = _env.overlay()
    env.filters["local"] = local
    page = env.get_template("status.html").render(
        doc=doc, view=_view(doc, params), headline=_headline(doc), counts=_counts(doc),
        limits=[r for r in (_limit(r, now_ts, local) for r in doc["rules"]) if r is not None],
        others=[r for r in doc["rules"] if not _is_limit(r)], problems=_problems(doc),
        utc_offset=f"{offset[:3]}:{offset[3:]}" if offset else "", refresh_s=REFRESH_S,
        small_site=len(doc["meters"]) <= SMALL_SITE,
        kw=lambda w: "-" if w is None else f"{float(w) / 1000:,.2f}",
        kwh=lambda x: f"{float(x or 0):,.3f}",
        group_url=lambda g: "/?" + urlencode({"group": g}))
    return page.encode()


def _counts(doc: Mapping[str, Any]) -> dict[str, int]:
    p = doc["problems"]
    n = {k: len(p.get(k) or ()) for k in ("stale", "offline", "unknown")}
    n["ok"] = sum(1 for m in doc["meters"] if m["state"] == "ok")
    n["meters"] = len(doc["meters"])
    n["problems"] = n["stale"] + n["offline"] + n["unknown"] + (
        1 if (p.get("dead_letters") or {}).get("count") else 0) + len(p.get("health") or ())
    return n


def _headline(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator must know first: a breach, else a warning or problem, else ok."""
    rules = doc["rules"]
    breach = [r for r in rules if r["state"] == "breach"]
    warning = [r for r in rules if r["state"] == "warning"]
    health = doc["problems"].get("health") or []
    items = [f"{r['id']} ({r['scope']}): {r['message']}" for r in breach + warning]
    items += [f"daemon: {x}" for x in health]
    if breach:
        orders = len(doc["orders"]["active"])
        text = (f"BREACH: {len(breach)} rule{'s' if len(breach) > 1 else ''} in breach"
                + (f", {orders} order{'s' if orders > 1 else ''} in force" if orders else
                   ", no order in force"))
        return {"state": "breach", "word": "BREACH", "text": text, "lines": items}
    counts = _counts(doc)
    if warning or counts["problems"]:
        parts = []
        if warning:
            parts.append(f"{len(warning)} rule{'s' if len(warning) > 1 else ''} at warning")
        if counts["problems"]:
            parts.append(f"{counts['problems']} problem{'s' if counts['problems'] > 1 else ''}")
        return {"state": "warning", "word": "warning", "text": "Attention: " + ", ".join(parts),
                "lines": items}
    return {"state": "ok", "word": "ok",
            "text": "All limits OK, every meter reports" + (
                ", the daemon is healthy" if doc["problems"].get("health") is not None else ""),
            "lines": []}


def _is_limit(r: Mapping[str, Any]) -> bool:
    return (r.get("unit") in ("kWh", "kW") and isinstance(r.get("value"), int | float)
            and isinstance(r.get("limit"), int | float) and r["limit"] > 0)


def _limit(r: Mapping[str, Any], now: float, local: Any) -> dict[str, Any] | None:
    """A rule with a limit, as a progress bar with its projection and when it is reached."""
    if not _is_limit(r):
        return None
    value, limit = float(r["value"]), float(r["limit"])
    ratio = value / limit
    out = dict(r)
    out.update(bar=True, pct=math.floor(ratio * 100), fill_width=round(min(1.0, ratio) * 100, 1),
               value_text=figure(value, limit), limit_text=figure(limit, limit, exact=True),
               projected_text=None, proj_pct=None, proj_width=None, reach="")
    projected = r.get("projected")
    if isinstance(projected, int | float) and math.isfinite(projected):
        proj = float(projected) / limit
        out["projected_text"] = figure(float(projected), limit)
        out["proj_pct"] = math.floor(proj * 100)
        extra = min(1.0, proj) * 100 - out["fill_width"]
        out["proj_width"] = round(extra, 1) if extra > 0 else None
    limit_at = r.get("limit_at")
    if r["state"] == "breach":
        out["reach"] = "Limit reached."
    elif limit_at:
        when = parse_rfc3339(str(limit_at))
        if isinstance(projected, int | float) and projected < limit:
            out["reach"] = (f"At this rate the limit is not reached this period "
                            f"(it would be on {local(limit_at)[:16]}).")
        else:
            out["reach"] = (f"At this rate the limit is reached on {local(limit_at)[:16]} "
                            f"(in {human_duration(when - now)}).")
    return out


def _problems(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    p = doc["problems"]
    by_id = {m["id"]: m for m in doc["meters"]}
    out: list[dict[str, Any]] = []
    for key, tag, what in (("offline", "offline", "offline (their last will said so)"),
                           ("stale", "stale", "stale (no reading for twice their interval)"),
                           ("unknown", "warning",
                            "reporting but not configured: outside every group cap, no "
                            "control topic (add them to [[meters]]; energy-monitor meters "
                            "discover lists them)")):
        ids = p.get(key) or []
        if ids:
            rows = [by_id[i] for i in ids[:PROBLEM_ROWS] if i in by_id]
            out.append({"tag": tag, "title": key, "count": len(ids),
                        "text": f"{len(ids)} meter{'s' if len(ids) > 1 else ''} {what}"
                                + (f"; the first {len(rows)} below" if len(ids) > len(rows)
                                   else ""),
                        "url": "/?" + urlencode({"state": key}) if len(ids) > len(rows) else "",
                        "rows": rows, "letters": []})
    dead = p.get("dead_letters") or {}
    if dead.get("count"):
        out.append({"tag": "warning", "title": "dead letters", "count": dead["count"],
                    "text": f"{dead['count']} messages could not be read and were kept as "
                            "dead letters; the newest below", "url": "",
                    "rows": [], "letters": dead.get("recent") or []})
    for reason in p.get("health") or []:
        out.append({"tag": "breach", "title": "health", "count": 1, "text": reason, "url": "",
                    "rows": [], "letters": []})
    return out


def _view(doc: Mapping[str, Any], params: Mapping[str, str]) -> dict[str, Any]:
    """The summary (``kind = "main"``) or one page of a meter listing."""
    if "group" in params:
        group = params["group"]
        rows = [m for m in doc["meters"] if (m["group"] or "") == group]
        title = f"Group {group}" if group else "Meters without a group"
        base = {"group": group}
    elif params.get("state") in _LISTS:
        state = params["state"]
        if state == "unknown":
            wanted = set(doc["problems"].get("unknown") or ())
            rows = [m for m in doc["meters"] if m["id"] in wanted]
        elif state == "all":
            rows = list(doc["meters"])
        else:
            rows = [m for m in doc["meters"] if m["state"] == state]
        title, base = _LISTS[state], {"state": state}
    else:
        return {"kind": "main"}
    rows.sort(key=lambda m: (_STATE_ORDER.get(m["state"], 3), m["id"]))
    pages = max(1, math.ceil(len(rows) / PAGE_ROWS))
    try:
        page = min(pages, max(1, int(params.get("page", "1"))))
    except ValueError:
        page = 1

    def url(n: int) -> str:
        return "/?" + urlencode({**base, "page": n})

    states: dict[str, int] = {}
    for m in rows:
        states[m["state"]] = states.get(m["state"], 0) + 1
    return {"kind": "list", "title": title, "total": len(rows), "page": page, "pages": pages,
            "rows": rows[(page - 1) * PAGE_ROWS:page * PAGE_ROWS],
            "summary": ", ".join(f"{n} {s}" for s, n in sorted(
                states.items(), key=lambda kv: _STATE_ORDER.get(kv[0], 3))),
            "prev_url": url(page - 1) if page > 1 else "",
            "next_url": url(page + 1) if page < pages else ""}
