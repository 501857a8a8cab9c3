"""Real time-series databases for tests: VictoriaMetrics and InfluxDB 1.x on free ports.

Both come from Debian packages (``victoria-metrics``, ``influxdb``) that
``scripts/install-deps`` installs; nothing here assumes a service is already
running.  Each helper owns its process and its data directory, and stops the
process (terminate, wait, kill) when its ``with`` block ends, whatever happened
inside.

VictoriaMetrics accepts InfluxDB line protocol on ``/write`` and ``/api/v2/write``
(so ``influxdb-client`` can write to it) and turns ``measurement`` + ``field``
into one metric name: ``energy_reading`` with field ``power_w`` becomes
``energy_reading_power_w``; tags become labels; string fields are stored as 0.
It keeps duplicate samples (no ``-dedup.minScrapeInterval`` here), so
:meth:`VM.export` shows a point written twice as two samples: that is what
lets the exporter's tests count "exactly once".

InfluxDB 1.6 has no ``/api/v2/write``; tests load it through ``/write`` with
lines built by :mod:`monitor.outputs.exporter` and query it with InfluxQL.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import ServiceProcess, find_binary, free_port, stop_process, wait_port


def _http(method: str, url: str, body: bytes | None = None,
          timeout_s: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            status, body = _http("GET", url, timeout_s=2.0)
            if status in (200, 204):
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s}s ({last})")


# --------------------------------------------------------------------------- VictoriaMetrics


@dataclass(frozen=True)
class Series:
    """One exported VictoriaMetrics series: metric name, labels, samples in time order."""

    name: str
    labels: dict[str, str]
    timestamps_ms: list[int]
    values: list[float]

    def key(self, *label_names: str) -> tuple[str, ...]:
        return (self.name, *(self.labels.get(k, "") for k in label_names))


@dataclass
class VM(ServiceProcess):
    """A private single-node VictoriaMetrics.  ``stop()``/``start()`` keep port and data."""

    workdir: Path
    port: int = 0
    extra_flags: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "data"
        self.log = self.workdir / "victoria-metrics.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VM:
        binary = find_binary("victoria-metrics", "/usr/bin/victoria-metrics")
        argv = [
            binary,
            f"-storageDataPath={self.data}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-retentionPeriod=100y",
            "-search.disableCache",
            "-loggerLevel=ERROR",
            *self.extra_flags,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, timeout_s=30, proc=self.proc)
            _wait_http_ok(self.url + "/health", self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM: VictoriaMetrics flushes what it buffered to disk before exiting."""
        stop_process(self.proc)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write(self, lines: Iterable[str]) -> None:
        """Write line protocol (ns precision) directly, bypassing the exporter."""
        body = "\n".join(lines).encode()
        status, text = _http("POST", self.url + "/write?precision=ns", body)
        if status != 204:
            raise RuntimeError(f"VictoriaMetrics /write: HTTP {status}: {text[:300]!r}")

    def flush(self) -> None:
        """Make everything written so far visible to searches."""
        _http("GET", self.url + "/internal/force_flush")

    def export(self, match: str = '{__name__=~"energy_.*"}') -> list[Series]:
        """All raw samples of the series matching ``match`` (a series selector).

        Samples of one series that VictoriaMetrics returns in several blocks are
        merged; duplicates (same timestamp) are kept, so they can be counted.
        """
        self.flush()
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        status, body = _http("POST", self.url + "/api/v1/export", query.encode())
        if status != 200:
            raise RuntimeError(f"VictoriaMetrics export: HTTP {status}: {body[:300]!r}")
        merged: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
        for raw in body.decode().splitlines():
            if not raw.strip():
                continue
            item: dict[str, Any] = json.loads(raw)
            metric = tuple(sorted((str(k), str(v)) for k, v in item["metric"].items()))
            merged.setdefault(metric, []).extend(
                zip((int(t) for t in item["timestamps"]),
                    (float(v) for v in item["values"]), strict=True))
        out: list[Series] = []
        for metric, samples in sorted(merged.items()):
            labels = dict(metric)
            name = labels.pop("__name__")
            samples.sort(key=lambda s: s[0])
            out.append(Series(name, labels, [t for t, _ in samples], [v for _, v in samples]))
        return out


def victoria_metrics(workdir: Path, **kw: Any) -> VM:
    """``with victoria_metrics(dir) as vm:`` -- started, and stopped at the end."""
    return VM(workdir, **kw)


# --------------------------------------------------------------------------- InfluxDB 1.x


class InfluxQLError(RuntimeError):
    """A query that InfluxDB answered with an error (parse error, unknown function...)."""


@dataclass
class Influx1(ServiceProcess):
    """A private InfluxDB 1.x (Debian ships 1.6) with one database, ``database``.

    Only the HTTP API listens (on a free loopback port); the RPC bind-address
    is a second free loopback port; graphite/collectd/opentsdb/udp are off,
    usage reporting and the ``_internal`` monitor database are disabled.
    """

    workdir: Path
    database: str = "energy"
    port: int = 0
    rpc_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.rpc_port = self.rpc_port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "influxdb.conf"
        self.log = self.workdir / "influxd.log"
        w = self.workdir
        self.conf.write_text(
            "\n".join(
                [
                    "reporting-disabled = true",
                    f'bind-address = "127.0.0.1:{self.rpc_port}"',
                    "[meta]",
                    f'  dir = "{w}/meta"',
                    "  logging-enabled = false",
                    "[data]",
                    f'  dir = "{w}/data"',
                    f'  wal-dir = "{w}/wal"',
                    "  query-log-enabled = false",
                    "[monitor]",
                    "  store-enabled = false",
                    "[subscriber]",
                    "  enabled = false",
                    "[continuous_queries]",
                    "  enabled = false",
                    "[http]",
                    "  enabled = true",
                    f'  bind-address = "127.0.0.1:{self.port}"',
                    "  auth-enabled = false",
                    "  log-enabled = false",
                    "  pprof-enabled = false",
                    "[logging]",
                    '  level = "error"',
                    "  suppress-logo = true",
                    "",
                ]
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Influx1:
        binary = find_binary("influxd", "/usr/bin/influxd")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([binary, "run", "-config", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, timeout_s=30, proc=self.proc)
            _wait_http_ok(self.url + "/ping", self.proc)
            self.query(f'CREATE DATABASE "{self.database}"')
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def write(self, lines: Iterable[str]) -> None:
        """``/write?db=...&precision=ns``; raises on anything but 204."""
        body = "\n".join(lines).encode()
        qs = urllib.parse.urlencode({"db": self.database, "precision": "ns"})
        status, text = _http("POST", f"{self.url}/write?{qs}", body)
        if status != 204:
            raise RuntimeError(f"influxdb /write: HTTP {status}: {text[:500]!r}")

    def query(self, q: str, epoch: str = "ms") -> list[dict[str, Any]]:
        """Run InfluxQL; return the ``series`` of all statements (empty list: no data).

        Raises :class:`InfluxQLError` when InfluxDB reports an error for the
        request or for any statement.
        """
        form = urllib.parse.urlencode({"db": self.database, "q": q, "epoch": epoch})
        status, body = _http("POST", self.url + "/query", form.encode())
        try:
            doc: dict[str, Any] = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise InfluxQLError(f"HTTP {status}: {body[:300]!r}") from exc
        if status != 200 or "error" in doc:
            raise InfluxQLError(f"HTTP {status}: {doc.get('error', body[:300])}")
        series: list[dict[str, Any]] = []
        for result in doc.get("results", []):
            if "error" in result:
                raise InfluxQLError(str(result["error"]))
            series.extend(result.get("series", []))
        return series


def influxdb1(workdir: Path, **kw: Any) -> Influx1:
    """``with influxdb1(dir) as db:`` -- started, and stopped at the end."""
    return Influx1(workdir, **kw)


# --------------------------------------------------------------------------- fault injection


@dataclass(frozen=True)
class Recorded:
    """One request the proxy saw: path with query, line count, answer it gave."""

    path: str
    lines: int
    status: int
    authorization: str


class FaultProxy:
    """A real HTTP server in front of a time-series database, to inject write faults.

    Modes (switch at any time, from the test's thread):

    - :meth:`forward` -- pass every request through to ``upstream`` unchanged;
    - :meth:`fail` -- answer ``status`` with ``body`` and ``headers``;
    - :meth:`reject_lines` -- answer 400 (InfluxDB 2.x style JSON) to any
      write with a line that starts with ``prefix``, forward the others;
    - :meth:`hang` -- hold each request up to ``seconds`` and then answer 204
      without forwarding (the client has long given up: a timeout).

    Every request is recorded in :attr:`requests`.  ``close()`` releases held
    requests and stops the server.
    """

    def __init__(self, upstream: str) -> None:
        import http.server  # noqa: PLC0415
        import threading  # noqa: PLC0415

        self.upstream = upstream.rstrip("/")
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._mode: tuple[str, Any] = ("forward", None)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip  # noqa: PLC0415

                    body = gzip.decompress(body)
                status, headers, answer = proxy._answer(self.path, body, dict(self.headers))
                lines = len([ln for ln in body.split(b"\n") if ln.strip()])
                with proxy._lock:
                    proxy.requests.append(Recorded(self.path, lines, status,
                                                   self.headers.get("Authorization", "")))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST  # noqa: N815 - the name http.server dispatches to

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fault-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def forward(self) -> None:
        self._set(("forward", None))

    def fail(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
        self._set(("fail", (status, body, headers or {})))

    def reject_lines(self, prefix: str) -> None:
        self._set(("reject", prefix))

    def hang(self, seconds: float) -> None:
        self._set(("hang", seconds))

    def _set(self, mode: tuple[str, Any]) -> None:
        with self._lock:
            self._mode = mode

    def _answer(self, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            kind, arg = self._mode
        if kind == "fail":
            status, text, extra = arg
            return status, {"Content-Type": "application/json", **extra}, text.encode()
        if kind == "hang":
            self._release.wait(arg)
            return 204, {}, b""
        if kind == "reject":
            bad = [ln for ln in body.split(b"\n") if ln.startswith(arg.encode())]
            if bad:
                msg = json.dumps({"code": "invalid",
                                  "message": f"unable to parse '{bad[0].decode()}': "
                                             "injected bad line"})
                return 400, {"Content-Type": "application/json"}, msg.encode()
        req = urllib.request.Request(self.upstream + path, data=body, method="POST")
        for key in ("Content-Type", "Authorization"):
            if key in headers:
                req.add_header(key, headers[key])
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(resp.status), {}, bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), {}, bytes(exc.read())
        except OSError as exc:
            return 502, {}, str(exc).encode()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- a store to export from


def open_store(path: Path) -> sqlite3.Connection:
    """A real SQLite store with the project's schema (autocommit connection).

    Uses ``monitor.store.db.migrate`` when that module provides it, else applies
    :data:`monitor.store.schema.MIGRATIONS` directly.
    """
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate: Any = None
    with contextlib.suppress(ImportError):
        migrate = getattr(importlib.import_module("monitor.store.db"), "migrate", None)
    if migrate is not None:
        migrate(conn)
    else:
        from monitor.store.schema import MIGRATIONS  # noqa: PLC0415

        for _, sql in sorted(MIGRATIONS):
            conn.executescript(sql)
    return conn


def add_meter(conn: sqlite3.Connection, meter: str, group: str = "", fmt: str = "") -> None:
    conn.execute("INSERT INTO meters (id, device, grp, format) VALUES (?, ?, ?, ?)",
                 (meter, meter, group, fmt))


Row = tuple[str, float, float | None, float | None, float, float | None, float | None]
"""(meter, ts, power_w, energy_kwh, delta_kwh, voltage_v, current_a)"""


def add_readings(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO readings (meter, ts, power_w, energy_kwh, delta_kwh, voltage_v, current_a)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
