"""The intake worker: messages from the MQTT queue -> parse -> account -> one store commit.

Thread model: :meth:`Intake.run` is the only consumer of the queue and the only
user of the parsers, the accounting states and its own :class:`Store`.  The
MQTT network thread only puts :class:`~monitor.core.model.Message` objects into the
queue.  After a batch is committed, ``ack(messages)`` is called so that the
MQTT layer acknowledges exactly what is durable.  If a commit fails (disk full,
database locked by hand, file removed) the batch is kept and retried with
backoff: nothing is acknowledged, nothing is dropped, and because the queue is
bounded (and MQTT 5 Receive Maximum bounds what the broker sends us), the
broker holds the rest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from monitor.config import Config, CurtailmentRule, MeterResolver
from monitor.core import accounting
from monitor.core.accounting import MeterParams, MeterState
from monitor.core.model import (
    Availability,
    Message,
    ParseError,
    ParseResult,
    Reading,
    TsSource,
)
from monitor.core.signal import parse_signal
from monitor.intake.flow import IntakeQueue
from monitor.intake.parsers import Parser, make_parser
from monitor.intake.parsers.discovery import DiscoveryRegistry
from monitor.metrics import Metrics
from monitor.store.db import StoreError
from monitor.store.ledger import IntakeBatch, Rollup, Store

log = logging.getLogger(__name__)

DEAD_LETTER_KEEP_BYTES = 1024
IDLE_TICK_S = 1.0  # an idle worker stamps ``taken_at`` this often (watchdog progress)
STOP = object()  # queue sentinel: drain what came before, then return
NO_SOURCE, SIGNAL, DISCOVERY, BAD_TOPIC = -1, -2, -3, -4  # routes other than a [[sources]] index
#: no device publishes these: wildcards (MQTT forbids them in a PUBLISH topic), control
#: and line-separator characters (they would reach device ids, logs and line protocol)
_BAD_TOPIC_RE = re.compile("[+#\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: formats whose devices publish Home Assistant discovery configs the parsers can use
DISCOVERY_FORMATS = frozenset({"esphome", "zigbee2mqtt"})


def discovery_prefix(config: Config) -> str:
    """The discovery prefix the daemon listens on, or "" when no source can use it."""
    prefix = config.intake.discovery_prefix.strip("/")
    if prefix and any(s.format in DISCOVERY_FORMATS for s in config.sources):
        return prefix
    return ""


def subscriptions(config: Config) -> list[tuple[str, int]]:
    """The MQTT filters the daemon subscribes to, in order, with their QoS.

    The position + 1 of a filter is its Subscription Identifier (see
    :mod:`monitor.intake.mqtt`); the intake uses the same list to take exactly one copy
    of a message that several filters match.
    """
    subs = [(s.topic, config.mqtt.qos) for s in config.sources]
    subs += [(r.topic, 1) for r in config.rules if isinstance(r, CurtailmentRule)]
    prefix = discovery_prefix(config)
    if prefix:  # retained configs: sent again at every (re)subscribe
        subs += [(f"{prefix}/+/+/config", 1), (f"{prefix}/+/+/+/config", 1)]
    return list(dict(subs).items())  # one subscription per filter


def _filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters (conservative for ``$`` topics)."""
    la, lb = a.split("/"), b.split("/")
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True


def overlapping(filters: Sequence[str]) -> frozenset[int]:
    """Positions of the filters that share a topic with another filter of the list.

    Only these are subscribed with a Subscription Identifier: a message of any
    other filter is the only copy the broker sends, and a PUBLISH without
    properties is much cheaper for paho to read (see :mod:`monitor.intake.mqtt`)."""
    return frozenset(i for i, a in enumerate(filters)
                     for j, b in enumerate(filters) if i != j and _filters_overlap(a, b))


def fingerprint(topic: str, payload: bytes, mid: int = 0) -> bytes:
    """One delivered message: its packet id, topic and payload.

    A broker resends an unacknowledged QoS 1 message with its original packet id
    (MQTT 5, 4.4), so the id tells a redelivery from a new message with the same
    bytes: receipt-stamped devices repeat their payloads all the time (a plain
    ``3512`` power, a counter that did not move), and a redelivered message that
    was *not* committed must not be taken for one that was."""
    head = f"{mid}\0{topic}\0".encode()
    return hashlib.blake2b(head + payload, digest_size=16).digest()


#: a meter's in-memory state before a batch: (accounting state, online, last_seen,
#: first_seen, format)
_Saved = tuple[tuple[object, ...], bool, float | None, float | None, str]


@dataclass
class _Meter:
    id: str
    device: str
    group: str
    format: str
    params: MeterParams
    state: MeterState
    online: bool = True
    last_seen: float | None = None
    first_seen: float | None = None


@dataclass
class BatchReport:
    messages: int = 0
    readings: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    ignored: int = 0
    skipped: int = 0


@dataclass
class Intake:
    """Turns message batches into committed store batches.  See module docstring."""

    config: Config
    store: Store
    metrics: Metrics
    ack: Callable[[Sequence[Message]], None] = lambda msgs: None
    queue: IntakeQueue = field(default_factory=lambda: IntakeQueue(maxsize=10000))
    _meters: dict[str, _Meter] = field(default_factory=dict, init=False)
    _parsers: list[Parser] = field(default_factory=list, init=False)
    _route: dict[str, int] = field(default_factory=dict, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    #: read by the health check from other threads (plain attribute reads are atomic)
    commit_error: str = field(default="", init=False)
    last_commit_at: float | None = field(default=None, init=False)
    #: progress points for the systemd watchdog (time.monotonic()): when the loop last
    #: took from the queue, since when it holds a batch, since when it tries to commit
    taken_at: float = field(default_factory=time.monotonic, init=False)
    busy_since: float | None = field(default=None, init=False)
    commit_since: float | None = field(default=None, init=False)
    #: why :meth:`run` ended by an exception ("" while it runs or after a clean stop)
    failure: str = field(default="", init=False)

    def __post_init__(self) -> None:
        c = self.config
        prefix = discovery_prefix(c)
        self._discovery_prefix = prefix + "/" if prefix else ""
        self._registry = DiscoveryRegistry(prefix) if prefix else None
        self._parsers = [make_parser(s.format, s.options, self._registry, s.topic)
                         for s in c.sources]
        # [[meters]] entries by device, then [[meter_patterns]] (config.MeterResolver)
        self._by_device = MeterResolver(c)
        self._configured = {m.id: m for m in c.meters}
        self._dirty: set[str] = set()
        self._counts: dict[tuple[str, str], int] = {}  # metrics, added once per batch
        # the in-memory state of each meter a batch touched, as it was before the
        # batch: put back when processing fails (see handle)
        self._saved: dict[str, _Saved] = {}
        self._days = accounting.LocalDays(c.site.tz)
        self._signal_topics = [r.topic for r in c.rules if isinstance(r, CurtailmentRule)]
        self._filters = [t for t, _ in subscriptions(c)]
        self._overlapping = overlapping(self._filters)
        self._primary: dict[str, int] = {}  # topic -> the subscription id that owns it
        self._clock = accounting.ClockBounds(c.intake.max_clock_ahead_s,
                                             c.intake.max_clock_behind_s)
        #: device id -> the [[sources]] entry it was first read from (collision check)
        self._device_source: dict[str, int] = {}
        self._unconfigured = 0
        self.store.register_meters(
            (m.id, m.devices[0], m.group) for m in c.meters)
        for row in self.store.meters():
            self._meters[row.id] = self._new_meter(row.id, row.device, row.format,
                                                   MeterState.from_json(row.acct),
                                                   row.online, row.last_seen)
            if row.id not in self._configured and self._by_device.get(row.device) is None:
                self._unconfigured += 1

    # ------------------------------------------------------------------ meters

    def _new_meter(self, meter_id: str, device: str, fmt: str, state: MeterState,
                   online: bool = True, last_seen: float | None = None) -> _Meter:
        mc = self._configured.get(meter_id)
        if mc is None and self.config.meter_patterns:  # a pattern's meter, if it is this id
            pm = self._by_device.get(device)
            mc = pm if pm is not None and pm.id == meter_id else None
        ic = self.config.intake
        params = MeterParams(
            rated_kw=mc.rated_kw if mc else None,
            max_gap_s=ic.max_gap_s,
            jitter_kwh=ic.jitter_kwh,
            unrated_max_kw=ic.unrated_max_kw,
        )
        return _Meter(meter_id, device, mc.group if mc else "", fmt, params, state, online,
                      last_seen)

    def _meter(self, device: str, fmt: str) -> _Meter:
        mc = self._by_device.get(device)
        meter_id = mc.id if mc else device
        m = self._meters.get(meter_id)
        if m is None:
            m = self._new_meter(meter_id, device, fmt, MeterState())
            self._meters[meter_id] = m
            if mc is None:
                self._unconfigured += 1
        self._save(m)
        if not m.format:
            m.format = fmt
        return m

    def _refuse_device(self, device: str, src: int) -> tuple[str, str] | None:
        """Why a reading of ``device`` from source ``src`` cannot be accounted, if so."""
        # a parser's ids are injective over every topic of its format (the whole
        # variable part of the topic); only two formats can claim one id
        first = self._device_source.setdefault(device, src)
        if first != src:
            a, b = self.config.sources[first], self.config.sources[src]
            if a.format != b.format:
                return ("device_id_collision",
                        f"device id {device!r} is already read as {a.format} from "
                        f"[[sources]] {a.topic!r}; this {b.format} topic matches "
                        f"{b.topic!r}: give the devices distinct names")
        if device in self._by_device:
            return None
        if self._meters.get(device) is not None:
            return None
        ic = self.config.intake
        if not ic.allow_unconfigured:
            return ("unconfigured_device",
                    f"no [[meters]] entry names device {device!r} and "
                    "intake.allow_unconfigured is false")
        if self._unconfigured >= ic.max_unconfigured_meters:
            return ("too_many_meters",
                    f"{self._unconfigured} unconfigured meters already "
                    f"(intake.max_unconfigured_meters); configure {device!r} in [[meters]]")
        return None

    # ------------------------------------------------------------------ processing

    def _route_of(self, topic: str) -> int:
        """Cached per topic: ``SIGNAL`` for a curtailment topic, the index of the first
        matching ``[[sources]]`` entry, or ``NO_SOURCE``."""
        idx = self._route.get(topic)
        if idx is None:
            idx = NO_SOURCE
            if _BAD_TOPIC_RE.search(topic):
                idx = BAD_TOPIC
            elif any(topic_matches_sub(t, topic) for t in self._signal_topics):
                idx = SIGNAL
            elif (self._discovery_prefix and topic.startswith(self._discovery_prefix)
                  and topic.endswith("/config")):
                idx = DISCOVERY
            else:
                for i, s in enumerate(self.config.sources):
                    if topic_matches_sub(s.topic, topic):
                        idx = i
                        break
            if len(self._route) > 200_000:
                self._route.clear()
            self._route[topic] = idx
        return idx

    def _primary_of(self, topic: str) -> int:
        """The Subscription Identifier of the first filter matching ``topic`` (0: none,
        or that filter overlaps no other and is subscribed without an identifier)."""
        sid = self._primary.get(topic)
        if sid is None:
            sid = next((i + 1 for i, f in enumerate(self._filters)
                        if topic_matches_sub(f, topic)), 0)
            if sid and sid - 1 not in self._overlapping:
                sid = 0
            if len(self._primary) > 200_000:
                self._primary.clear()
            self._primary[topic] = sid
        return sid

    def process(self, messages: Sequence[Message]) -> tuple[IntakeBatch, BatchReport]:
        """Parse and account ``messages`` (no I/O except the redelivery look-up)."""
        batch = IntakeBatch()
        rep = BatchReport(messages=len(messages))
        # counted here, not in paho's callback: the network thread is the bottleneck
        self.metrics.messages_received.inc(len(messages))
        dropped = self.queue.take_dropped()
        if dropped:  # QoS 0 messages the full queue could not take (see intake.flow)
            rep.ignored += dropped
            key = ("ignored", "queue_full", "-")
            batch.outcomes[key] = batch.outcomes.get(key, 0) + dropped
        fps = [fingerprint(m.topic, m.payload, m.mid) for m in messages]
        dup_fps = [(m.mid, fp) for m, fp in zip(messages, fps, strict=True) if m.dup]
        already = self.store.seen(dup_fps) if dup_fps else set()
        in_batch: set[bytes] = set()
        max_bytes = self.config.intake.max_payload_bytes
        for msg, fp in zip(messages, fps, strict=True):
            if msg.dup and (fp in already or fp in in_batch):
                rep.duplicates += 1
                self._count("-", "redelivery")
                continue
            in_batch.add(fp)
            if msg.qos:
                batch.fingerprints.append((msg.mid, fp))
            if msg.sub_ids and (primary := self._primary_of(msg.topic)) \
                    and primary not in msg.sub_ids:
                # the same message again, for another filter that matches its topic
                rep.ignored += 1
                self._outcome(batch, "ignored", "overlapping_subscription", "-")
                continue
            src = self._route_of(msg.topic)
            if src == SIGNAL:
                self._signal(msg, batch, rep)
                continue
            if src == DISCOVERY:
                self._discovery(msg, batch, rep)
                continue
            if src == BAD_TOPIC:
                self._dead(batch, rep, msg, "bad_topic",
                           "a wildcard or control character in the topic: no device "
                           "publishes that")
                continue
            if src == NO_SOURCE:
                self._dead(batch, rep, msg, "unknown_topic", "no [[sources]] entry matches")
                continue
            fmt = self.config.sources[src].format
            if len(msg.payload) > max_bytes:
                self._dead(batch, rep, msg, "too_large",
                           f"{len(msg.payload)} bytes > intake.max_payload_bytes {max_bytes}", fmt)
                continue
            try:
                result = self._parsers[src].parse(msg.topic, msg.payload, msg.received_at,
                                                  msg.retain)
            except ParseError as exc:
                self._dead(batch, rep, msg, exc.reason, exc.detail, fmt)
                continue
            except Exception as exc:  # a parser bug must not stop the stream
                log.exception("parser %s failed on %s", fmt, msg.topic)
                self._dead(batch, rep, msg, "parser_error", repr(exc)[:200], fmt)
                continue
            self._apply(result, msg, src, batch, rep)
        for meter_id in self._dirty:
            m = self._meters[meter_id]
            # the load: production (negative power) is never load
            load = max(m.state.power_w, 0.0) if m.online and m.state.power_w is not None \
                else None
            batch.meters[m.id] = (m.device, m.group, m.format, m.first_seen, m.last_seen,
                                  load, int(m.online), m.state.to_json())
        self._dirty.clear()
        for (label, outcome), n in self._counts.items():
            self.metrics.readings.labels(label, outcome).inc(n)
        self._counts.clear()
        for (outcome, reason, label), n in batch.outcomes.items():
            self.metrics.outcomes.labels(outcome, reason, label).inc(n)
        return batch, rep

    def _count(self, fmt: str, outcome: str) -> None:
        key = (fmt, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _outcome(self, batch: IntakeBatch, outcome: str, reason: str, fmt: str) -> None:
        key = (outcome, reason, fmt)
        batch.outcomes[key] = batch.outcomes.get(key, 0) + 1

    def _apply(self, result: ParseResult, msg: Message, src: int, batch: IntakeBatch,
               rep: BatchReport) -> None:
        fmt = self.config.sources[src].format
        for reason in result.skipped:
            rep.skipped += 1
            self._outcome(batch, "skipped", reason, fmt)
        if not result.readings and not result.availability:
            if result.ignored:
                rep.ignored += 1
                self._count(fmt, "ignored")
                self._outcome(batch, "ignored", result.ignored, fmt)
            else:  # a parser must say why it read nothing; never let it vanish
                self._dead(batch, rep, msg, "no_measurement",
                           "the message holds no value this format reads"
                           + (f" (skipped: {', '.join(result.skipped)})" if result.skipped
                              else ""), fmt)
            return
        refused: tuple[str, str] | None = None
        accepted = []
        for r in result.readings:
            why = self._refuse_device(r.device, src)
            if why is None:
                accepted.append(r)
            else:
                refused = why
        if refused is not None and not accepted:
            self._dead(batch, rep, msg, refused[0], refused[1], fmt)
            return
        for av in result.availability:
            self._availability(av, msg.received_at, fmt)
        for r in accepted:
            self._reading(r, msg, fmt, batch)
            rep.readings += 1
        if refused is not None:  # some channels of the message refused, others read
            rep.skipped += 1
            self._outcome(batch, "skipped", refused[0], fmt)

    def _availability(self, av: Availability, at: float, fmt: str) -> None:
        # channels ("shelly/x:0") and ESPHome sensors ("esphome/node/power") of the device
        prefixes = (av.device + ":", av.device + "/")
        def covered(m: _Meter) -> bool:
            mc = self._configured.get(m.id)
            devices = mc.devices if mc else (m.device,)
            return any(d == av.device or d.startswith(prefixes) for d in devices)

        targets = [m for m in self._meters.values() if covered(m)]
        if not targets and av.device in self._by_device:
            targets = [self._meter(av.device, fmt)]
        for m in targets:
            self._save(m)
            m.online = av.online
            if not av.online:
                accounting.mark_offline(m.state, at)
            self._dirty.add(m.id)

    def _rollup(self, batch: IntakeBatch, meter: str, bucket: int) -> Rollup:
        dkey = (meter, self._days.day(bucket))
        row = batch.daily.get(dkey)
        if row is None:
            row = batch.daily[dkey] = Rollup()
        return row

    def _reading(self, r: Reading, msg: Message, fmt: str, batch: IntakeBatch) -> None:
        m = self._meter(r.device, fmt)
        r, clock = accounting.bound_clock(r, msg.received_at, self._clock)
        if clock:
            batch.anomalies.append((m.id, r.ts, clock, r.device_ts,
                                    f"device time {r.device_ts} received at {msg.received_at}"))
            self.metrics.anomalies.labels(clock).inc()
        reset = None
        if m.state.last_ts is not None and m.state.last_ts > max(msg.received_at, r.ts) + \
                accounting.CLOCK_HOLD_MAX_S:
            # the state holds a time far ahead of any clock now (an older version
            # stored an unbounded device time, or the clock was corrected by hours):
            # restart the meter's clock, keep its counter: the next delta is counted.
            # A smaller step back is accounting's (clock_step: held, never lost)
            reset = accounting.restart_clock(m.state, r.ts, m.params)
        out = accounting.apply(m.state, r, m.params, msg.retain)
        if reset is not None:
            out.anomalies.insert(0, reset)
            out.flags.append("clock_reset")
        if msg.retain:
            out.flags.append("retained")
        if clock:
            out.flags.append(clock)
        m.online = True
        m.last_seen = r.ts if m.last_seen is None else max(m.last_seen, r.ts)
        m.first_seen = r.ts if m.first_seen is None else min(m.first_seen, r.ts)
        self._dirty.add(m.id)
        since = out.increments[0].start_ts if out.increments else None
        batch.readings.append((m.id, r.ts, r.power_w, r.energy_kwh, out.delta_kwh, r.voltage_v,
                               r.current_a, ",".join(out.flags), since,
                               r.device_ts if r.ts_source is TsSource.RECEIVED else None,
                               r.export_kwh))
        self._count(fmt, "accounted")
        for inc in out.increments:
            mwh = accounting.book_mwh(m.state, inc.kwh)
            for bucket, part in accounting.split_mwh(inc.start_ts, inc.end_ts, mwh):
                key = (m.id, bucket)
                batch.ledger[key] = batch.ledger.get(key, 0) + part
                self._rollup(batch, m.id, bucket).mwh += part
        if out.export_delta_kwh > 0:
            bucket = int(out.book_ts // accounting.BUCKET_S) * accounting.BUCKET_S
            self._rollup(batch, m.id, bucket).export_mwh += round(
                out.export_delta_kwh * accounting.MWH_PER_KWH)
        for g in out.gaps:
            batch.gaps.append((m.id, g.start_ts, g.end_ts, g.upper_kwh, g.reason))
            span = g.end_ts - g.start_ts
            for bucket, share in accounting.split_buckets(g.start_ts, g.end_ts, 1.0):
                row = self._rollup(batch, m.id, bucket)
                row.gap_kwh += (g.upper_kwh or 0.0) * share
                row.gap_s += span * share
        for a in out.anomalies:
            batch.anomalies.append((m.id, a.ts, a.kind, a.value, a.detail))
            self.metrics.anomalies.labels(a.kind).inc()

    def _discovery(self, msg: Message, batch: IntakeBatch, rep: BatchReport) -> None:
        """A Home Assistant discovery config: what a sensor measures, in which unit."""
        assert self._registry is not None
        try:
            result = self._registry.update(msg.topic, msg.payload)
        except ParseError as exc:
            self._dead(batch, rep, msg, exc.reason, exc.detail, "discovery")
            return
        rep.ignored += 1
        self._outcome(batch, "ignored", result.ignored or "discovery_config", "discovery")

    def _signal(self, msg: Message, batch: IntakeBatch, rep: BatchReport) -> None:
        try:
            sig = parse_signal(msg.payload, msg.received_at)
        except ValueError as exc:
            self._dead(batch, rep, msg, "bad_signal", str(exc))
            return
        batch.signals.append((msg.topic, sig.target_kw, sig.until, msg.received_at,
                              msg.payload.decode("utf-8", "replace")))

    def _dead(self, batch: IntakeBatch, rep: BatchReport, msg: Message, reason: str,
              detail: str, fmt: str = "-") -> None:
        rep.dead_letters += 1
        batch.dead_letters.append((msg.received_at, msg.topic, reason, detail[:500],
                                   len(msg.payload), msg.payload[:DEAD_LETTER_KEEP_BYTES]))
        self.metrics.dead_letters.labels(reason).inc()
        self._count(fmt, "dead_letter")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Consume the queue until :data:`STOP` is taken from it (or :meth:`stop`).

        The intake thread's target.  An exception that escapes the loop (a bug:
        every expected failure is handled inside) ends the thread: it is logged
        with its traceback and kept in :attr:`failure`, which :meth:`stalled`
        reports, so the service stops with a failure instead of running on
        without intake.  Nothing after the last commit was acknowledged, so the
        broker still holds those messages."""
        try:
            self._loop()
        except BaseException as exc:
            if isinstance(exc, StoreError) and self._stop.is_set():
                log.error("intake stopped with its batch uncommitted (shutdown): %s", exc)
                return
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("intake worker died, nothing after the last commit acknowledged: "
                         "%s", self.failure, exc_info=exc)

    def _loop(self) -> None:
        cfg = self.config.intake
        while True:
            self.busy_since = None
            # wake up now and then, so that an idle loop shows it is alive
            got = self.queue.take(cfg.batch_size, IDLE_TICK_S)
            self.taken_at = time.monotonic()
            if not got:
                continue
            self.busy_since = self.taken_at
            if got[0] is STOP:
                return
            deadline = self.taken_at + cfg.batch_wait_ms / 1000.0
            stopping = any(x is STOP for x in got)
            while not stopping and len(got) < cfg.batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                more = self.queue.take(cfg.batch_size - len(got), left)
                if not more:
                    break
                got += more
                stopping = any(x is STOP for x in more)
            if stopping:  # what came before the sentinel is drained; nothing follows it
                got = got[:next(i for i, x in enumerate(got) if x is STOP)]
            msgs: list[Message] = got  # type: ignore[assignment]
            self.metrics.queue_depth.set(self.queue.qsize())
            if msgs:
                self.handle(msgs)
            if stopping:
                return

    def _save(self, m: _Meter) -> None:
        if m.id not in self._saved:
            self._saved[m.id] = (accounting.state_values(m.state), m.online, m.last_seen,
                                 m.first_seen, m.format)

    def _roll_back(self) -> None:
        """Undo what a failed :meth:`process` did to the meters in memory."""
        for meter_id, (values, online, last_seen, first_seen, fmt) in self._saved.items():
            m = self._meters[meter_id]
            accounting.restore_state(m.state, values)
            m.online, m.last_seen, m.first_seen, m.format = online, last_seen, first_seen, fmt
        self._saved.clear()
        self._counts.clear()

    def handle(self, msgs: Sequence[Message]) -> BatchReport:
        """Process and commit one batch, retrying the commit until it succeeds or we stop.

        A defect that raises while a batch is processed (every expected failure is
        handled inside: this is a bug) must not turn one message into a restart loop:
        the meters are put back as they were, and the batch is taken again one
        message at a time; the message that raises again becomes the dead letter
        ``internal_error`` (payload kept, so it can be replayed once the defect is
        fixed), and the others are committed as usual."""
        self._saved.clear()
        try:
            batch, rep = self.process(msgs)
        except Exception:
            log.exception("intake: processing a batch of %d failed (a defect); "
                          "retrying it one message at a time", len(msgs))
            self._roll_back()
            rep = BatchReport(messages=len(msgs))
            for msg in msgs:
                one = self._one(msg)
                rep.dead_letters += one.dead_letters
            return rep
        self._commit(batch, msgs)
        return rep

    def _one(self, msg: Message) -> BatchReport:
        self._saved.clear()
        try:
            batch, rep = self.process([msg])
        except Exception as exc:
            log.exception("intake: %s: this message makes the intake fail (a defect); kept "
                          "as the dead letter internal_error", msg.topic)
            self._roll_back()
            batch, rep = IntakeBatch(), BatchReport(messages=1)
            if msg.qos:
                batch.fingerprints.append((msg.mid, fingerprint(msg.topic, msg.payload, msg.mid)))
            self._dead(batch, rep, msg, "internal_error", f"{type(exc).__name__}: {exc}")
        self._commit(batch, [msg])
        return rep

    def _commit(self, batch: IntakeBatch, msgs: Sequence[Message]) -> None:
        self._saved.clear()
        delay = 0.5
        self.commit_since = time.monotonic()
        while True:
            t0 = time.perf_counter()
            try:
                self.store.commit_batch(batch)
                break
            except StoreError as exc:
                self.commit_error = str(exc)
                self.metrics.store_errors.inc()
                self.metrics.store_ok.set(0)
                log.error("store commit failed, batch of %d kept and retried in %.1fs: %s",
                          len(msgs), delay, exc)
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 30.0)
        self.commit_error = ""
        self.commit_since = None
        self.last_commit_at = time.time()
        self.metrics.store_ok.set(1)
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        self.metrics.last_commit.set(self.last_commit_at)
        self.ack(msgs)

    def stalled(self, now: float, limit_s: float) -> str:
        """Why the intake or the store writer made no progress for ``limit_s`` (monotonic
        ``now``), or "".  An idle intake (empty queue) is progressing."""
        if self.failure:
            return f"intake: worker died: {self.failure}"
        commit, busy = self.commit_since, self.busy_since
        if commit is not None and now - commit > limit_s:
            why = f": {self.commit_error}" if self.commit_error else ""
            return f"store writer: a batch has waited {now - commit:.0f}s for its commit{why}"
        if commit is None and busy is not None and now - busy > limit_s:
            return f"intake: one batch in processing for {now - busy:.0f}s"
        depth = self.queue.qsize()
        if busy is None and depth and now - self.taken_at > limit_s:
            return f"intake: {depth} messages waiting, none taken for {now - self.taken_at:.0f}s"
        return ""

    def stop(self) -> None:
        """Ask :meth:`run` to finish: queued messages are still drained first."""
        self.queue.put(STOP)

    def abort(self) -> None:
        """Give up retrying a failing commit (used only at shutdown)."""
        self._stop.set()
        self.queue.put(STOP)
