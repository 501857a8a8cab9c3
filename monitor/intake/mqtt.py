"""The MQTT edge: one paho-mqtt 2.x client (MQTT 5) for intake, orders and presence.

Contracts:

* Incoming PUBLISH packets are read on paho's network thread and only copied into
  the intake queue (:class:`~monitor.core.model.Message`); no parsing or I/O there.
* Messages are acknowledged manually (:meth:`MqttLink.ack`), by the intake
  worker, after their batch is committed: one write of all the batch's PUBACKs.
  Receive Maximum bounds how many unacknowledged messages the broker sends; a
  broker that does not keep to it (mosquitto < 2.0.13 draining a backlog) is held
  back by TCP: a packet is read only while the intake queue has room, and while
  it is full the network thread still writes PUBACKs and keeps the connection
  alive (:mod:`monitor.intake.flow` shows why the queue never overflows).
* The receive path is lean (:class:`_IntakeClient`): socket reads are buffered
  (stock paho makes three ``recv`` calls per packet), and a QoS 0/1 PUBLISH whose
  only properties are Subscription Identifiers is decoded in a few lines instead
  of through paho's ``MQTTMessage``/``Properties`` objects and callback matching.
  Anything else (QoS 2, other properties, a non-UTF-8 topic, a malformed packet)
  takes paho's own path.  Only filters that overlap another one get a
  Subscription Identifier, so most PUBLISH packets carry no property at all.
  This costs about a tenth of paho's own receive path; it is what lets one
  Python process parse, account and commit at a rate close to what a bare paho
  client only counts (``docs/benchmarks.md``).
* The session is persistent: fixed client id, ``clean_start=False`` and a
  Session Expiry Interval, so the broker queues readings while we are down.
* Subscriptions are (re)made in ``on_connect``, so every reconnect restores them.
  Each carries a Subscription Identifier (its position + 1): a topic matched by
  two filters arrives once per filter, and the intake processes only the copy
  of the first filter that matches.  Filters the daemon subscribed to before
  and no longer has (``unsubscribe``) are removed from the persistent session.
* Presence: retained ``online`` on ``energy-monitor/<site>/status``; the last
  will (and a clean stop) says ``offline``.

Library exceptions are translated to :class:`MqttError` here.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from monitor.config import Config
from monitor.core.model import Message
from monitor.intake.flow import OVERFLOW_WAIT_S, PAUSE_SLICE_S, IntakeQueue
from monitor.intake.worker import overlapping
from monitor.metrics import Metrics

log = logging.getLogger(__name__)

_PUBACK = struct.Struct("!BBH")  # MQTT 5 PUBACK, reason Success: fixed header, length 2, id
_PUBLISH, _PUBACK_CMD, _SUB_ID = 0x30, 0x40, 0x0B
_READ_CHUNK = 65536
#: paho internals the lean receive path relies on; without them paho's own path is used
_PAHO_HOOKS = ("_handle_publish", "_sock_recv", "_packet_read", "_loop_rc_handle",
               "_packet_queue", "loop_read", "loop_write", "loop_misc", "want_write")
_CONNECTED = getattr(getattr(paho, "_ConnectionState", None), "MQTT_CS_CONNECTED", None)
FAST_PATH = _CONNECTED is not None and all(callable(getattr(paho.Client, n, None))
                                           for n in _PAHO_HOOKS)

Deliver = Callable[[str, bytes, int, bool, bool, int, tuple[int, ...]], None]


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise IndexError("variable byte integer longer than 4 bytes")


class _IntakeClient(paho.Client):
    """paho's client with a buffered socket read, a lean PUBLISH decoder and a read
    that waits for room in the intake queue (see the module docstring).
    ``deliver(topic, payload, qos, retain, dup, mid, sub_ids)`` is called on the
    network thread for each QoS 0/1 message it decodes itself; ``room(timeout)``
    says whether the intake queue can take one more message, waiting up to
    ``timeout`` s; ``paused()`` is called each time reading stops for want of room."""

    def __init__(self, *args: Any, deliver: Deliver, room: Callable[[float], bool],
                 paused: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deliver = deliver
        self._room = room
        self._paused = paused
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None
        self._chunks = 0  # socket reads into the buffer
        self.fast_packets = 0  # PUBLISH packets decoded by the lean path (tests read it)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._rsock:  # a new connection: nothing of the old one is left
            self._rsock, self._rbuf, self._rpos = self._sock, b"", 0
        pos = self._rpos
        if pos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, _READ_CHUNK))
            self._chunks += 1
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, pos = data, 0
        end = pos + bufsize
        self._rpos = end
        return self._rbuf[pos:end]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read one packet from the socket, then every packet already in the buffer
        (select() would not report those), each only once the intake queue has room.

        A packet that runs past the buffer reads the next chunk, so a broker that
        sends without pause keeps this loop going: after each chunk it also does
        what paho's loop does between reads (:meth:`_service`), or the PUBACKs
        would never leave and the broker would drop us for silence."""
        chunks = self._chunks
        while True:
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            # (the CONNACK is always read: what follows it waits for room)
            if self._state == _CONNECTED and not self._room(0.0):
                rc = self._wait_for_room()
                if rc is not None:
                    return rc
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN or self._sock is None \
                    or self._sock is not self._rsock or self._rpos >= len(self._rbuf):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            if self._chunks != chunks:
                chunks = self._chunks
                rc = self._service()
                if rc is not None:
                    return rc

    def _service(self) -> MQTTErrorCode | None:
        """What paho's loop does between reads: write what waits (the worker's PUBACKs,
        our publications) and keep the connection alive (PINGREQ when due).  ``None``:
        carry on reading; else the connection is gone and this is what to return."""
        if self.want_write():
            rc = self.loop_write()
            if rc or self._sock is None:
                return rc or MQTTErrorCode.MQTT_ERR_NO_CONN
        rc = self.loop_misc()
        if rc or self._sock is None:
            return rc or MQTTErrorCode.MQTT_ERR_NO_CONN
        return None

    def _wait_for_room(self) -> MQTTErrorCode | None:
        """The intake queue is full: read nothing until it has room, but go on writing
        (the worker's PUBACKs) and keeping the connection alive.  ``None`` once there
        is room; else what :meth:`loop_read` returns without reading (the connection
        was lost, or the loop is stopping)."""
        self._paused()
        while not self._room(PAUSE_SLICE_S):
            if self._thread_terminate:
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # loop_stop(): let paho's loop end
            rc = self._service()
            if rc is not None:
                return rc
        return None

    def _handle_publish(self) -> MQTTErrorCode:
        cmd = self._in_packet["command"]
        data = self._in_packet["packet"]
        qos = (cmd & 0x06) >> 1
        if qos > 1 or self._protocol != paho.MQTTv5:
            return super()._handle_publish()
        try:
            pos = 2 + ((data[0] << 8) | data[1])
            topic = bytes(data[2:pos]).decode("utf-8")
            mid = 0
            if qos:
                mid = (data[pos] << 8) | data[pos + 1]
                pos += 2
            plen, pos = _varint(data, pos)
            end = pos + plen
            ids: tuple[int, ...] = ()
            while pos < end:
                if data[pos] != _SUB_ID:
                    return super()._handle_publish()
                sid, pos = _varint(data, pos + 1)
                ids += (sid,)
            if pos != end or end > len(data) or "\0" in topic:
                return super()._handle_publish()
        except (IndexError, UnicodeDecodeError):
            return super()._handle_publish()  # paho reports it (MalformedPacket etc.)
        self.fast_packets += 1
        self._deliver(topic, bytes(data[end:]), qos, bool(cmd & 0x01), bool(cmd & 0x08),
                      mid, ids)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Sequence[int]) -> None:
        """Acknowledge QoS 1 messages (``manual_ack``): all PUBACKs in one write."""
        if mids:
            pack = _PUBACK.pack
            self._packet_queue(_PUBACK_CMD, b"".join([pack(_PUBACK_CMD, 2, m) for m in mids]),
                               0, 1)


class MqttError(Exception):
    """The broker cannot be reached or refused us."""


def status_topic(site_id: str) -> str:
    return f"energy-monitor/{site_id}/status"


def orders_topic(site_id: str) -> str:
    return f"energy-monitor/{site_id}/orders"


class MqttLink:
    """The daemon's MQTT client.  Thread-safe for :meth:`publish` and :meth:`ack`."""

    def __init__(
        self,
        config: Config,
        sink: IntakeQueue,
        metrics: Metrics,
        subscriptions: Sequence[tuple[str, int]],
        *,
        on_connected: Callable[[bool], None] | None = None,
        unsubscribe: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        self.subscriptions = list(subscriptions)
        self.unsubscribe = [t for t in unsubscribe if t not in dict(self.subscriptions)]
        self.on_connected = on_connected
        self.connected = threading.Event()
        self.last_error = ""
        self._accepting = True
        # set when a put found the queue full all the same (see _deliver): nothing more
        # is taken on this connection (left unacknowledged, re-delivered in the
        # session after reconnecting)
        self._overflowed = False
        self.overflows = 0  # such refusals (each: a reconnect)
        self._paused_logged = False  # one warning per connection
        self._overlapping = overlapping([t for t, _ in self.subscriptions])
        mc = config.mqtt
        self.client: paho.Client
        if FAST_PATH:
            self.client = _IntakeClient(CallbackAPIVersion.VERSION2, client_id=config.client_id,
                                        protocol=paho.MQTTv5, manual_ack=True,
                                        deliver=self._deliver, room=sink.wait_room,
                                        paused=self._on_paused)
        else:  # pragma: no cover - a paho without the internals the lean path uses
            log.warning("paho-mqtt %s lacks the internals of the lean receive path; "
                        "using paho's own", getattr(paho, "__version__", "?"))
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=config.client_id,
                                      protocol=paho.MQTTv5, manual_ack=True)
        if mc.username is not None:
            self.client.username_pw_set(
                mc.username, mc.password.get_secret_value() if mc.password else None)
        if mc.tls is not None:
            try:
                self.client.tls_set(
                    ca_certs=str(mc.tls.ca_file) if mc.tls.ca_file else None,
                    certfile=str(mc.tls.cert_file) if mc.tls.cert_file else None,
                    keyfile=str(mc.tls.key_file) if mc.tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise MqttError(f"mqtt.tls: {exc}") from exc
            self.client.tls_insecure_set(mc.tls.insecure)
        self.client.will_set(status_topic(config.site.id), "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(int(max(1, mc.reconnect_min_s)),
                                        int(max(mc.reconnect_min_s, mc.reconnect_max_s)))
        # our own orders must not wait behind a full outgoing window
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    properties: Properties | None) -> None:
        if rc.is_failure:
            self.last_error = f"connection refused: {rc}"
            log.error("MQTT %s", self.last_error)
            return
        session_present = bool(getattr(flags, "session_present", False))
        log.info("MQTT connected to %s:%s (session present: %s)", self.config.mqtt.host,
                 self.config.mqtt.port, session_present)
        if self.unsubscribe and session_present:
            log.info("MQTT unsubscribing filters no longer configured: %s",
                     ", ".join(self.unsubscribe))
            client.unsubscribe(self.unsubscribe)
        self._overflowed = False
        self._paused_logged = False
        for i, (topic, qos) in enumerate(self.subscriptions):
            props = None
            if i in self._overlapping:
                props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                props.SubscriptionIdentifier = i + 1
            client.subscribe(topic, qos=qos, properties=props)
        client.publish(status_topic(self.config.site.id), "online", qos=1, retain=True)
        self.last_error = ""
        self.metrics.mqtt_connected.set(1)
        self.metrics.mqtt_connects.inc()
        self.connected.set()
        if self.on_connected:
            self.on_connected(session_present)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode,
                       properties: Properties | None) -> None:
        self.connected.clear()
        self.metrics.mqtt_connected.set(0)
        if rc.value != 0 and not self._overflowed:
            self.last_error = f"disconnected: {rc}"
            log.warning("MQTT %s; paho reconnects with backoff", self.last_error)

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        """paho's own path (QoS 2, unusual properties): the same as the lean one."""
        ids = getattr(m.properties, "SubscriptionIdentifier", None) if m.properties else None
        self._deliver(m.topic, bytes(m.payload), m.qos, bool(m.retain), bool(m.dup), m.mid,
                      tuple(ids) if ids else ())

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool,
                 mid: int, sub_ids: tuple[int, ...]) -> None:
        """Network thread: enqueue one message, never waiting without bound."""
        if not self._accepting or self._overflowed:
            return  # not acknowledged: the broker re-delivers it to our next session
        msg = Message(topic, payload, time.time(), qos, retain, dup, mid, sub_ids)
        if qos == 0:
            if not self.sink.offer_qos0(msg):
                self.metrics.queue_dropped.inc()
            return
        try:
            self.sink.put_nowait(msg)
            return
        except queue.Full:
            pass
        # a packet is read only while the queue has room (_IntakeClient.loop_read), so
        # only a STOP put meanwhile can take the last place (or a paho without the lean
        # path, which reads regardless); wait a little, then refuse rather than stop
        # answering the broker's keepalive
        self.metrics.queue_blocked.inc()
        try:
            self.sink.put(msg, timeout=OVERFLOW_WAIT_S)
        except queue.Full:
            self._refuse_and_reconnect()

    def _on_paused(self) -> None:
        """Network thread: reading stops until the intake queue has room."""
        self.metrics.read_paused.inc()
        if not self._paused_logged:
            self._paused_logged = True
            log.warning("MQTT intake queue full (%d messages): reading paused until the "
                        "intake makes room; acknowledgements and keepalive go on. The broker "
                        "sent more than Receive Maximum %d allows (mosquitto before 2.0.13 "
                        "does when it drains a backlog) or re-sent messages after a reconnect",
                        self.sink.qsize(), self.config.mqtt.receive_maximum)

    def _refuse_and_reconnect(self) -> None:
        self._overflowed = True
        self.overflows += 1
        self.last_error = "intake queue full: message left unacknowledged; reconnecting"
        log.error("MQTT %s", self.last_error)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            # paho sees the connection lost and reconnects with backoff; what we did not
            # acknowledge comes again in the persistent session
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ API

    def start(self) -> None:
        mc = self.config.mqtt
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = mc.session_expiry_s
        props.ReceiveMaximum = mc.receive_maximum
        try:
            self.client.connect_async(mc.host, mc.port, keepalive=mc.keepalive_s,
                                      clean_start=False, properties=props)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {mc.host}:{mc.port}: {exc}") from exc
        self.client.loop_start()

    def ack(self, msgs: Sequence[Message]) -> None:
        """Acknowledge committed messages (called by the intake worker)."""
        if isinstance(self.client, _IntakeClient):
            self.client.ack_many([m.mid for m in msgs if m.qos == 1])
            for m in msgs:
                if m.qos == 2:
                    self.client.ack(m.mid, 2)
            return
        for m in msgs:
            if m.qos > 0:
                self.client.ack(m.mid, m.qos)

    def publish(self, topic: str, payload: str | bytes, qos: int = 1,
                retain: bool = False) -> paho.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return info

    def stop_intake(self) -> None:
        """Stop putting messages in the queue; what arrives now is left unacknowledged."""
        self._accepting = False

    def close(self, timeout_s: float = 5.0) -> None:
        """Say ``offline`` (retained), disconnect keeping the session, stop the network thread."""
        if self.connected.is_set():
            try:
                info = self.client.publish(status_topic(self.config.site.id), "offline",
                                           qos=1, retain=True)
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()
        self.metrics.mqtt_connected.set(0)
