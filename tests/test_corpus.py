"""The replay corpus (``tests/corpus/*.json``) end to end: real mosquitto, the real daemon.

Each corpus file is one payload sequence of a real device shape (its source is
named in the file) with the energy per meter worked out by hand from the
payloads.  See ``tests/corpus/README.md`` for the file format.

The files are grouped: one broker and one daemon per group (by default, one
group per format), run side by side.  A group's run has three phases:

* ``pre``: retained messages published before the daemon first starts (the
  broker hands them over on subscribe, with the retain flag);
* ``live``: every file's messages, published at ``at_s`` seconds after the
  phase starts, QoS 1;
* ``post``: the daemon is stopped (SIGTERM) and started again, so the broker
  replays every retained topic with the retain flag -- a replay must never
  count twice -- and then the ``post`` messages are published.

After each phase the test waits until the daemon has committed every message
it was sent (the store's message fingerprints) and a marker published last.
Then each file's expectations are checked against the ledger, the meters and
the dead letters.  ``test_corpus_file_is_well_formed`` checks the files
themselves, without a broker.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, publisher, query, wait_for, write_config
from tests.servers import Mosquitto

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = sorted(CORPUS.glob("*.json"))
FORMATS = ("json", "tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt", "esphome",
           "emonhub", "mbmd")
PHASES = ("pre", "live", "post")
#: what a format's group subscribes to unless a file says ``"default_sources": false``
DEFAULT_SOURCES: dict[str, tuple[str, ...]] = {
    "json": ("corpus/json/#",),
    "tasmota": ("tele/#",),
    "shelly_gen1": ("shellies/#",),
    "shelly_gen2": ("+/events/rpc", "+/status/#", "+/online"),
    "zigbee2mqtt": ("zigbee2mqtt/#",),
    "esphome": ("+/sensor/+/state", "+/status"),
    "emonhub": ("emon/#",),
    "mbmd": ("mbmd/#",),
}
MARKER_TOPIC = "corpus-marker/zz"
MARKER_METER = "zz-marker"
TOLERANCE_KWH = 1e-6  # one mWh: the ledger's unit
KEYS = {"source", "device", "format", "group", "why", "sources_toml", "default_sources",
        "messages", "expect", "expect_match", "expect_power_w", "expect_outcomes",
        "tolerance_kwh", "note"}
MESSAGE_KEYS = {"topic", "payload", "retain", "at_s", "phase", "qos", "note"}
_JSON_HOLE = re.compile(r'"\$(T|MS|US|ISO)([+-][0-9]+(?:\.[0-9]+)?)?"')
_TEXT_HOLE = re.compile(r"\$(T|MS|US|ISO)([+-][0-9]+(?:\.[0-9]+)?)?")


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def group_of(doc: dict[str, Any]) -> str:
    return str(doc.get("group") or doc["format"])


def render(payload: object, base_ts: float) -> bytes:
    """The payload as sent: ``$T+60`` (Unix s), ``$MS``, ``$US``, ``$ISO`` are times
    relative to the group's start, so device clocks sit where the file wants them."""
    def value(kind: str, offset: str | None, quoted: bool) -> str:
        t = base_ts + float(offset or 0)
        if kind == "T":
            return f"{t:.3f}"
        if kind == "MS":
            return str(round(t * 1000))
        if kind == "US":
            return str(round(t * 1_000_000))
        iso = dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")
        iso = iso.replace("+00:00", "Z")
        return json.dumps(iso) if quoted else iso

    if isinstance(payload, str):
        return _TEXT_HOLE.sub(lambda m: value(m[1], m[2], False), payload).encode()
    text = json.dumps(payload, separators=(",", ":"))
    return _JSON_HOLE.sub(lambda m: value(m[1], m[2], True), text).encode()


# ---------------------------------------------------------------------------- well-formed


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_corpus_file_is_well_formed(path: Path) -> None:
    doc = load(path)
    assert set(doc) <= KEYS, f"unknown keys {set(doc) - KEYS}"
    assert re.match(r"https?://\S+$", doc.get("source", "")), "source must be an address"
    assert doc.get("device"), "device must describe the device"
    assert doc.get("why"), "why must hold the arithmetic of the expectation"
    assert doc["format"] in FORMATS
    msgs = doc["messages"]
    assert msgs, "no messages"
    for m in msgs:
        assert set(m) <= MESSAGE_KEYS, f"unknown message keys {set(m) - MESSAGE_KEYS}"
        assert isinstance(m["topic"], str) and m["topic"] and "+" not in m["topic"]
        assert isinstance(m["payload"], (str, dict, list))
        assert m.get("phase", "live") in PHASES
        if m.get("phase") == "pre":
            assert m.get("retain"), "only retained messages reach a daemon that never ran"
        assert float(m.get("at_s", 0)) <= 12.0, "keep the live phase short"
        render(m["payload"], 1.7e9)
    assert doc.get("expect") or doc.get("expect_match") or doc.get("expect_outcomes"), \
        "a file must expect something"
    for v in doc.get("expect", {}).values():
        assert v is None or (isinstance(v, (int, float)) and v >= 0)
    for spec in doc.get("expect_match", []):
        re.compile(spec["pattern"])
        assert set(spec) <= {"pattern", "meters", "kwh"}
    assert set(doc.get("expect_outcomes", {})) <= {"dead_letters", "ignored"}
    if "sources_toml" in doc:
        assert "[intake]" not in doc["sources_toml"] or doc.get("group"), \
            "an [intake] table needs a group of its own"


def test_corpus_covers_every_format() -> None:
    docs = [load(p) for p in FILES]
    assert len(docs) >= 40
    for fmt in FORMATS:
        assert sum(d["format"] == fmt for d in docs) >= 4, fmt


# ---------------------------------------------------------------------------- the run


@dataclass
class GroupRun:
    name: str
    docs: list[tuple[str, dict[str, Any]]]
    workdir: Path
    error: str = ""
    ledger: dict[str, float] = field(default_factory=dict)
    meters: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    dead: dict[str, dict[str, int]] = field(default_factory=dict)  # topic -> reason -> n
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    future_buckets: int = 0

    def config_body(self) -> str:
        formats = sorted({d["format"] for _, d in self.docs})
        filters: list[tuple[str, str]] = []
        extra = []
        for fmt in formats:
            if all(d.get("default_sources", True) for _, d in self.docs if d["format"] == fmt):
                filters += [(t, fmt) for t in DEFAULT_SOURCES[fmt]]
        for _, d in self.docs:
            if d.get("sources_toml"):
                extra.append(d["sources_toml"])
        body = "".join(f'[[sources]]\ntopic = "{t}"\nformat = "{f}"\n\n' for t, f in filters)
        body += "\n".join(extra) + "\n"
        body += f'[[sources]]\ntopic = "{MARKER_TOPIC}"\nformat = "json"\n'
        return body

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported per file by the tests below
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        base_ts = time.time()
        msgs = [(name, i, m) for name, d in self.docs for i, m in enumerate(d["messages"])]
        with Mosquitto(self.workdir / "mosquitto") as broker:
            cfg = write_config(self.workdir / "d.toml", broker.port, self.config_body(),
                               site=re.sub(r"[^a-z0-9_-]", "-", self.name.lower()))
            pub = publisher(broker.port, f"corpus-pub-{self.name}")
            retained: dict[str, bytes] = {}
            sent = 0
            try:
                pre = [m for _, _, m in msgs if m.get("phase") == "pre"]
                for m in pre:
                    payload = render(m["payload"], base_ts)
                    pub.publish(m["topic"], payload, qos=1, retain=True).wait_for_publish(10)
                    retained[m["topic"]] = payload
                sent += sum(1 for p in retained.values() if p)
                daemon = Daemon(cfg, self.workdir / "daemon.log").start()
                wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30,
                         what=f"{self.name}: daemon up")
                sent = self._settle(cfg, pub, sent, 1)
                sent += self._publish(pub, msgs, "live", base_ts, retained)
                sent = self._settle(cfg, pub, sent, 2)
                assert daemon.stop() == 0, "daemon did not stop cleanly"
                sent += sum(1 for p in retained.values() if p)  # replayed on subscribe
                daemon.start()
                sent = self._settle(cfg, pub, sent, 3)
                sent += self._publish(pub, msgs, "post", base_ts, retained)
                sent = self._settle(cfg, pub, sent, 4)
                assert daemon.stop() == 0, "daemon did not stop cleanly"
            finally:
                pub.disconnect()
                pub.loop_stop()
        self._read(cfg)

    def _publish(self, pub: Any, msgs: list[tuple[str, int, dict[str, Any]]], phase: str,
                 base_ts: float, retained: dict[str, bytes]) -> int:
        todo = sorted((float(m.get("at_s", 0)), name, i, m) for name, i, m in msgs
                      if m.get("phase", "live") == phase)
        t0 = time.monotonic()
        infos: list[Any] = []
        for at_s, _, _, m in todo:
            delay = t0 + at_s - time.monotonic()
            if delay > 0:
                for info in infos:
                    info.wait_for_publish(10)
                infos.clear()
                time.sleep(delay)
            payload = render(m["payload"], base_ts)
            retain = bool(m.get("retain", False))
            infos.append(pub.publish(m["topic"], payload, qos=int(m.get("qos", 1)),
                                     retain=retain))
            if retain:
                retained[m["topic"]] = payload
        for info in infos:
            info.wait_for_publish(10)
        return len(todo)

    def _settle(self, cfg: Path, pub: Any, sent: int, seq: int) -> int:
        """Wait until every message sent so far is committed, then for a marker after them."""
        def seen() -> int:
            return int((query(cfg, "SELECT count(*) FROM msg_seen") or [(0,)])[0][0])

        wait_for(lambda: seen() >= sent, 60, what=f"{self.name}: {sent} messages committed")
        # The marker is sent again until it is committed: the first one may reach the
        # broker before the daemon has subscribed (it is "up" once its store is open).
        payload = json.dumps({"meter": MARKER_METER, "power_w": float(seq), "seq": seq})
        deadline = time.monotonic() + 60
        while True:
            pub.publish(MARKER_TOPIC, payload, qos=1).wait_for_publish(10)
            try:
                wait_for(lambda: bool(query(cfg, "SELECT 1 FROM readings WHERE meter = ? AND "
                                                 "power_w = ?", (MARKER_METER, float(seq)))),
                         2, what=f"{self.name}: marker {seq} committed")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        return seen()  # everything before the marker is committed, markers lost or not

    def _read(self, cfg: Path) -> None:
        self.ledger = {str(m): int(v) / 1e6 for m, v in
                       query(cfg, "SELECT meter, sum(mwh) FROM ledger GROUP BY meter")}
        self.meters = {str(r[0]): (r[1], r[2]) for r in
                       query(cfg, "SELECT id, first_seen, power_w FROM meters")}
        for topic, reason, n in query(cfg, "SELECT topic, reason, count(*) FROM dead_letters"
                                           " GROUP BY topic, reason"):
            self.dead.setdefault(str(topic), {})[str(reason)] = int(n)
        for outcome, reason, n in query(cfg, "SELECT outcome, reason, sum(n) FROM "
                                             "intake_outcomes GROUP BY outcome, reason"):
            self.outcomes[(str(outcome), str(reason))] = int(n)
        self.future_buckets = int(query(cfg, "SELECT count(*) FROM ledger WHERE bucket > ?",
                                        (time.time() + 900,))[0][0])


def _groups(root: Path) -> dict[str, GroupRun]:
    groups: dict[str, GroupRun] = {}
    for p in FILES:
        doc = load(p)
        g = group_of(doc)
        if g not in groups:
            groups[g] = GroupRun(g, [], root / g)
        groups[g].docs.append((p.stem, doc))
    return groups


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GroupRun]]:
    """Every group run once, side by side; results only (all daemons stopped)."""
    groups = _groups(tmp_path_factory.mktemp("corpus"))
    threads = [threading.Thread(target=g.run, name=f"corpus-{g.name}") for g in groups.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    yield groups


def _check(run: GroupRun, name: str, doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    tol = float(doc.get("tolerance_kwh", TOLERANCE_KWH)) + 1e-9
    seen = {m for m, (first, _) in run.meters.items() if first is not None}
    for meter, kwh in doc.get("expect", {}).items():
        got = run.ledger.get(meter, 0.0)
        if kwh is None:
            if meter in seen:
                problems.append(f"{meter}: must not be a meter, has {got:.6f} kWh")
        elif meter not in seen:
            near = sorted(m for m in seen if m.split("/")[0] == meter.split("/")[0])
            problems.append(f"{meter}: no such meter (meters of that format: {near})")
        elif abs(got - kwh) > tol:
            problems.append(f"{meter}: {got:.6f} kWh, expected {kwh:.6f}")
    for spec in doc.get("expect_match", []):
        pat = re.compile(spec["pattern"])
        ids = sorted(m for m in seen if pat.search(m))
        total = sum(run.ledger.get(m, 0.0) for m in ids)
        if "meters" in spec and len(ids) != spec["meters"]:
            problems.append(f"/{spec['pattern']}/: {len(ids)} meters {ids}, "
                            f"expected {spec['meters']}")
        if "kwh" in spec and abs(total - spec["kwh"]) > tol:
            detail = {m: round(run.ledger.get(m, 0.0), 6) for m in ids}
            problems.append(f"/{spec['pattern']}/: {total:.6f} kWh {detail}, "
                            f"expected {spec['kwh']:.6f}")
    for meter, watts in doc.get("expect_power_w", {}).items():
        got_w = run.meters.get(meter, (None, None))[1]
        if got_w is None or abs(got_w - watts) > 1e-6:
            problems.append(f"{meter}: load {got_w} W, expected {watts} W")
    topics = {m["topic"] for m in doc["messages"]}
    dead: dict[str, int] = {}
    for t in topics:
        for reason, n in run.dead.get(t, {}).items():
            dead[reason] = dead.get(reason, 0) + n
    want_dead = doc.get("expect_outcomes", {}).get("dead_letters", {})
    if dead != want_dead:
        problems.append(f"dead letters {dead}, expected {want_dead}")
    return problems


def _ignored_problems(run: GroupRun) -> list[str]:
    """Ignored outcomes are counted per reason for a whole daemon: checked per group when
    every file of the group states its own."""
    docs = [d for _, d in run.docs]
    if not all("ignored" in d.get("expect_outcomes", {}) for d in docs):
        return []
    want: dict[str, int] = {}
    for d in docs:
        for reason, n in d["expect_outcomes"]["ignored"].items():
            want[reason] = want.get(reason, 0) + n
    got = {r: n for (o, r), n in run.outcomes.items() if o == "ignored" and n}
    return [] if got == want else [f"group {run.name}: ignored {got}, expected {want}"]


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_corpus_replay(path: Path, corpus_runs: dict[str, GroupRun]) -> None:
    doc = load(path)
    run = corpus_runs[group_of(doc)]
    assert not run.error, f"group {run.name} did not run: {run.error}"
    problems = _check(run, path.stem, doc)
    problems += _ignored_problems(run)
    if run.future_buckets:
        problems.append(f"group {run.name}: {run.future_buckets} ledger buckets in the future")
    assert not problems, f"{path.stem} ({doc['device']}):\n  " + "\n  ".join(problems)
