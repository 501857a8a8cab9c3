"""The operator's page (``GET /``): rendered from the status document by an autoescaping
template, checked in headless Chromium against the running daemon.

The end-to-end test starts mosquitto and the real daemon, publishes readings until a
group's daily cap is breached and its shutdown order is issued (the simulated rigs
do not obey, so the order stays pending), then loads the page in Chromium at a phone
and a desktop size: the DOM must show the breach, the order and its resume command,
the problems (a stale, an unknown meter, a dead letter), times in the site's zone,
and no external URL.  ``STATUS_PAGE_SCREENSHOTS=docs/img`` keeps the screenshots.

The scale test renders the page over a real store of 5,000 meters: the summary lists
no row per meter and stays small; a group and a problem are one click away.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import struct
import subprocess
import time
import tomllib
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from monitor import config
from monitor.app import status
from monitor.app.http import render_page
from monitor.store.ledger import IntakeBatch, Rollup, Store
from tests.daemon import Daemon, publisher, wait_for, write_config
from tests.servers import Mosquitto, find_binary, free_port

TZ = "Asia/Irkutsk"
ROOT = Path(__file__).resolve().parent.parent


class Dom(HTMLParser):
    """The facts a test reads from a page: text, <time> elements, every URL attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.times: list[tuple[str, str]] = []  # (datetime attribute, text)
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._time: str | None = None
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        for key in ("href", "src", "action", "srcset", "poster", "data"):
            if a.get(key):
                self.urls.append(str(a[key]))
        if "style" in a and "url(" in str(a["style"]):
            self.urls.append(str(a["style"]))
        if tag == "time":
            self._time, self._buf = str(a.get("datetime")), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "time" and self._time is not None:
            self.times.append((self._time, "".join(self._buf)))
            self._time = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._time is not None:
            self._buf.append(data)

    @property
    def all_text(self) -> str:
        return re.sub(r"\s+", " ", "".join(self.text))


def dom(html: str) -> Dom:
    d = Dom()
    d.feed(html)
    return d


def chromium() -> str:
    return find_binary("chromium", "/usr/bin/chromium")


def headless(*args: str) -> subprocess.CompletedProcess[bytes]:
    """One headless Chromium run (its own profile, no network beyond loopback)."""
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--disable-background-networking",
         "--user-data-dir=" + str(Path(os.environ.get("TMPDIR", "/tmp")) / f"chr-{os.getpid()}"),
         *args], capture_output=True, timeout=90, check=True)


def page_width(url: str, width: int, height: int) -> int:
    """The page's scroll width in Chromium at a ``width`` x ``height`` viewport (a phone's
    when narrow), over the DevTools protocol on a pipe: wider than ``width`` means the
    operator has to scroll sideways."""
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def fds() -> None:  # the protocol's pipe: Chromium reads fd 3 and writes fd 4
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
         "--user-data-dir=" + str(Path(os.environ.get("TMPDIR", "/tmp")) / f"cdp-{os.getpid()}"),
         "about:blank"], pass_fds=(3, 4), preexec_fn=fds,  # noqa: PLW1509 - dup2 only
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    buf = b""
    n = 0

    def call(method: str, params: dict[str, object], session: str | None = None
             ) -> dict[str, object]:
        nonlocal buf, n
        n += 1
        msg: dict[str, object] = {"id": n, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(to_chrome_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == n:
                    assert "error" not in answer, answer
                    return dict(answer["result"])
            chunk = os.read(from_chrome_r, 65536)
            assert chunk, "chromium closed the protocol pipe"
            buf += chunk

    def evaluate(sid: str, expr: str) -> object:
        got = call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, sid)
        result = got["result"]
        assert isinstance(result, dict)
        return result.get("value")

    try:
        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = str(call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"])
        call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                    "deviceScaleFactor": 1,
                                                    "mobile": width < 600}, sid)
        call("Page.navigate", {"url": url}, sid)
        wait_for(lambda: evaluate(sid, "document.readyState") == "complete", 30,
                 interval_s=0.1, what=f"{url} loaded")
        got = evaluate(sid, "document.documentElement.scrollWidth")
        assert isinstance(got, int | float)
        return int(got)
    finally:
        os.close(to_chrome_w)
        proc.kill()
        proc.wait(10)
        os.close(from_chrome_r)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


def local(ts_text: str) -> str:
    ts = dt.datetime.fromisoformat(ts_text.replace("Z", "+00:00"))
    return ts.astimezone(ZoneInfo(TZ)).strftime("%Y-%m-%d %H:%M:%S")


def assert_no_external_urls(html: str, d: Dom) -> None:
    assert all(u.startswith(("/", "#", "?")) for u in d.urls), d.urls
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert "link" not in d.tags and "script" not in d.tags and "img" not in d.tags


SITE = f"""
[schedule]
check_interval_s = 1

[[sources]]
topic = "site/+/reading"
format = "json"

{"".join(f'''
[[meters]]
id = "rig-0{i}"
device = "rig-0{i}"
group = "hall-a"
control = {{ kind = "tasmota", topic = "cmnd/rig-0{i}/POWER" }}
''' for i in range(1, 4))}
[[meters]]
id = "rig-09"
device = "rig-09"
group = "hall-b"

[[rules]]
id = "hall-a-daily"
kind = "energy_cap"
period = "calendar_day"
scope = "group:hall-a"
limit_kwh = 0.05
on_breach = ["alert", "shutdown"]

[[rules]]
id = "monthly-cap"
kind = "energy_cap"
period = "calendar_month"
limit_kwh = 6000

[[rules]]
id = "site-power"
kind = "power_cap"
limit_kw = 100
window_s = 300

[actions]
confirm_within_s = 600
"""


@pytest.mark.slow
def test_the_page_in_chromium_shows_breach_order_problems_in_the_site_zone(
        broker: Mosquitto, tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "d.toml", broker.port, SITE, tz=TZ, http=True,
                       extra_site='category = "individual"\nname = "Angarsk <test> farm"',
                       unrated_max_kw=1e6)
    cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"',
                                           f'listen = "127.0.0.1:{port}"'))
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port, "page-pub")
    try:
        base = f"http://127.0.0.1:{port}"

        def api() -> dict[str, object]:
            with urllib.request.urlopen(base + "/api/status", timeout=10) as r:
                return dict(json.loads(r.read()))

        def answers() -> bool:
            try:
                api()
                return True
            except OSError:
                return False

        wait_for(answers, 60, what="the daemon's HTTP server")
        # three rigs of hall-a at 8 kW each and a stray device nobody configured,
        # readings a second apart; rig-09 never reports (stale); one unreadable message
        t0 = time.time() - 30
        for k in range(31):
            for mid in ("rig-01", "rig-02", "rig-03", "stray-77"):
                kw = 8.0 if mid != "stray-77" else 1.5
                pub.publish(f"site/{mid}/reading", json.dumps({
                    "meter": mid, "ts": round(t0 + k, 3), "power_w": kw * 1000,
                    "energy_kwh": round(50 + kw * k / 3600, 6)}), qos=1).wait_for_publish(10)
        pub.publish("site/rig-01/reading", b"{not json", qos=1).wait_for_publish(10)

        def breached() -> bool:
            doc = api()
            orders = doc["orders"]
            assert isinstance(orders, dict)
            return bool(orders["active"]) and bool(doc["events"])

        wait_for(breached, 60, what="breach and shutdown order")

        out = Path(os.environ.get("STATUS_PAGE_SCREENSHOTS") or tmp_path)
        if not out.is_absolute():
            out = ROOT / out
        out.mkdir(parents=True, exist_ok=True)
        for name, size in (("status-phone.png", (390, 844)), ("status-desktop.png", (1366, 900))):
            shot = out / name
            headless(f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}", base + "/")
            assert png_size(shot) == size
            assert shot.stat().st_size < 400_000

            assert page_width(base + "/", *size) <= size[0], name
        html = headless("--dump-dom", "--window-size=390,844", base + "/").stdout.decode()
        d = dom(html)
        text = d.all_text
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
        assert_no_external_urls(html, d)
        # the breach first, then the order with its confirmation state and resume command
        assert re.search(r"BREACH: 1 rule in breach, 1 order in force", text), text[:400]
        assert "hall-a-daily (group:hall-a): daily limit reached" in text
        assert "Active: the rule is still in breach" in text
        assert "energy-monitor orders resume group:hall-a" in text
        assert re.search(r"shutdown ?group:hall-a ?hall-a-daily ?pending", text)
        # limits as bars with projection; the power cap is still warming up
        assert "warming up" in text
        assert re.search(r"\d+\.\d+ of 6000 kWh \(\d+%\) · projected [\d.]+ kWh", text)
        assert "At this rate the limit is reached on" in text
        # problems: the stale meter, the unknown device, the dead letter
        assert "1 meter stale" in text and "rig-09" in text
        assert "1 meter reporting but not configured" in text and "stray-77" in text
        assert "messages could not be read" in text
        # the site's name is escaped text, not markup
        assert "Angarsk <test> farm" in text and "<test>" not in html.replace("&lt;test&gt;", "")
        # times in the site's zone: every <time> shows its instant in Asia/Irkutsk
        assert d.times and all(shown == local(when) for when, shown in d.times), d.times[:3]
        m = re.search(r"as of (\S+ \S+) \(Asia/Irkutsk, UTC\+08:00\)", text)
        assert m is not None
        shown = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=ZoneInfo(TZ)).timestamp()
        assert abs(shown - time.time()) < 300  # the site's wall clock, not UTC's
        assert "rules checked" in text
        # events: the breach and the order
        assert "alert.firing" in text and "order.issued" in text
        # drill-down: a group page lists that group's meters
        group = dom(headless("--dump-dom", base + "/?group=hall-a").stdout.decode())
        assert "Group hall-a" in group.all_text and "rig-02" in group.all_text
        assert "rig-09" not in group.all_text
    finally:
        pub.disconnect()
        pub.loop_stop()
        daemon.stop()


def _big_store(path: Path, n: int, now: float) -> config.Config:
    """A store of ``n`` meters in 50 groups, three of them stale, as a big site's."""
    meters = "".join(f'[[meters]]\nid = "rig-{i:05d}"\ndevice = "rig-{i:05d}"\n'
                     f'group = "hall-{i % 50:02d}"\n' for i in range(n))
    c = config.parse(tomllib.loads(
        f'[site]\nid = "big"\ncategory = "individual"\ntimezone = "{TZ}"\n'
        '[[sources]]\ntopic = "x/#"\nformat = "json"\n'
        f'[storage]\npath = "{path}"\n{meters}'))
    st = Store(path)
    b = IntakeBatch()
    day = dt.datetime.fromtimestamp(now, ZoneInfo(TZ)).date().isoformat()
    stale = {1234, 4321, 4999}
    for i in range(n):
        mid = f"rig-{i:05d}"
        b.meters[mid] = (mid, f"hall-{i % 50:02d}", "json", now - 86400,
                         now - (3600 if i in stale else 5), 3000.0, 1, "{}")
        b.daily[(mid, day)] = Rollup(2_000_000)
    st.commit_batch(b)
    st.close()
    return c


def test_the_summary_of_5000_meters_lists_problems_not_meters(tmp_path: Path) -> None:
    now = time.time()
    c = _big_store(tmp_path / "m.db", 5000, now)
    st = Store(c.storage.path, readonly=True)
    try:
        doc = status.build(st, c, now)
    finally:
        st.close()
    assert doc["problems"]["stale"] == ["rig-01234", "rig-04321", "rig-04999"]
    assert len(doc["groups"]) == 50
    assert sum(g["meters"] for g in doc["groups"]) == 5000
    assert doc["totals"]["period_kwh"] == pytest.approx(10_000.0)
    page = render_page(doc, [])
    html = page.decode()
    d = dom(html)
    # the three stale meters are at the top, not at rows 1234, 4321 and 4999
    problems = d.all_text.split("Problems", 1)[1].split("Last", 1)[0]
    assert all(m in problems for m in ("rig-01234", "rig-04321", "rig-04999"))
    assert html.count("<tr") < 120  # 50 groups and 3 problems, never a row per meter
    assert len(page) < 100_000, len(page)  # measured: about 35 KB at 5,000 meters
    # each group is one click away, a page of its meters
    assert html.count('href="/?group=hall-') == 50
    group = render_page(doc, [], "group=hall-07").decode()
    assert group.count("<tr") == 1 + 100
    everything = render_page(doc, [], "state=all&page=25").decode()
    assert "page 25 of 25" in everything and everything.count("<tr") == 1 + 200
    assert "rig-01234" in render_page(doc, [], "state=stale").decode()


def test_every_value_is_escaped_by_the_template(tmp_path: Path) -> None:
    now = time.time()
    c = _big_store(tmp_path / "m.db", 3, now)
    st = Store(c.storage.path, readonly=True)
    try:
        doc = status.build(st, c, now)
    finally:
        st.close()
    evil = '<script>alert("x")</script>'
    doc["meters"][0]["id"] = evil
    doc["meters"][0]["group"] = evil
    doc["groups"][0]["group"] = evil
    doc["events"] = [{"kind": "alert.firing", "severity": "critical", "rule": evil,
                      "scope": evil, "at": doc["now"], "message": evil}]
    for query in ("", "state=all", "group=" + evil):
        html = render_page(doc, [evil], query).decode()
        assert "<script" not in html
        assert "&lt;script&gt;" in html


def test_the_phone_layout_has_no_horizontal_scroll_at_5000_meters(tmp_path: Path) -> None:
    """At 390 px (and at 1366 px) the summary, a group page and a page of all meters
    fit the width: nothing is cut off, nothing needs sideways scrolling."""
    now = time.time()
    c = _big_store(tmp_path / "m.db", 5000, now)
    st = Store(c.storage.path, readonly=True)
    try:
        doc = status.build(st, c, now)
    finally:
        st.close()
    for name, query in (("main", ""), ("group", "group=hall-03"), ("all", "state=all&page=2")):
        page = tmp_path / f"{name}.html"
        page.write_bytes(render_page(doc, ["mqtt: not connected: a long reason " * 3], query))
        for width, height in ((390, 844), (1366, 900)):
            assert page_width(page.as_uri(), width, height) <= width, (name, width)
