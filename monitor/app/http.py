"""Read-only HTTP: ``/healthz``, ``/metrics``, ``/api/status`` and a status page at ``/``.

Runs a :class:`ThreadingHTTPServer` in its own thread; every request reads the
store through a fresh connection (WAL readers never block the intake writer).
"""

from __future__ import annotations

import html
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
                path = self.path.split("?", 1)[0]
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
                        self._send(200, render_page(outer.status(), outer.health()),
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


def render_page(status: dict[str, Any], reasons: list[str]) -> bytes:
    """A small self-refreshing page for the site operator (no JavaScript, no assets)."""
    e = html.escape
    rows = "".join(
        f"<tr class='{e(m['state'])}'><td>{e(m['id'])}</td><td>{e(m['group'] or '')}</td>"
        f"<td>{e(m['format'] or '')}</td><td>{e(m['state'])}</td>"
        f"<td class='n'>{_num(m['power_w'], 0)}</td>"
        f"<td class='n'>{m['period_kwh']:.3f}</td><td>{e(m['last_seen'] or 'never')}</td></tr>"
        for m in status["meters"]
    )
    rules = "".join(
        f"<tr class='{e(r['state'])}'><td>{e(r['id'])}</td><td>{e(r['scope'])}</td>"
        f"<td>{e(r['state'])}</td><td class='n'>{_num(r['value'])}</td>"
        f"<td class='n'>{_num(r['limit'])} {e(r['unit'] or '')}</td>"
        f"<td class='n'>{_num(r['projected'])}</td></tr>"
        for r in status["rules"]
    )
    health = ("<p class='ok'>healthy</p>" if not reasons else
              "<ul class='bad'>" + "".join(f"<li>{e(x)}</li>" for x in reasons) + "</ul>")
    t = status["totals"]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="10"><title>energy-monitor {e(status['site'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}.n{{text-align:right}}
.warning{{background:#fff3cd}}.breach,.offline,.bad{{background:#f8d7da}}
.stale{{background:#fff3cd}}.ok{{color:#155724}}</style></head><body>
<h1>{e(status['site'])} &mdash; {e(status['period'])}</h1>
<p>{e(status['now'])} &middot; period {t['period_kwh']:.3f} kWh &middot;
power now {t['power_w'] / 1000:.2f} kW &middot; dead letters {status.get('dead_letters', 0)}</p>
{health}
<h2>Rules</h2><table><tr><th>rule</th><th>scope</th><th>state</th><th>value</th>
<th>limit</th><th>projected</th></tr>{rules}</table>
<h2>Meters</h2><table><tr><th>meter</th><th>group</th><th>format</th><th>state</th>
<th>power W</th><th>period kWh</th><th>last seen</th></tr>{rows}</table>
<p><small>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</small></p></body></html>"""
    return page.encode()


def _num(v: object, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, int | float):
        return f"{float(v):.{digits}f}"
    return html.escape(str(v))
