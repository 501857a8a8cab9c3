"""The MQTT edge: one paho-mqtt 2.x client (MQTT 5) for intake, orders and presence.

Contracts:

* ``on_message`` runs on paho's network thread and only copies the message into
  the intake queue (:class:`~monitor.core.model.Message`); it does no parsing or I/O.
* Messages are acknowledged manually (:meth:`MqttLink.ack`), by the intake
  worker, after their batch is committed.  Receive Maximum bounds how many
  unacknowledged messages the broker sends, so the queue never overflows for
  QoS >= 1.
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

import logging
import queue
import ssl
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
from monitor.metrics import Metrics

log = logging.getLogger(__name__)


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
        sink: queue.Queue[object],
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
        mc = config.mqtt
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
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
        for i, (topic, qos) in enumerate(self.subscriptions):
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
        if rc.value != 0:
            self.last_error = f"disconnected: {rc}"
            log.warning("MQTT %s; paho reconnects with backoff", self.last_error)

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker re-delivers it to our next session
        ids = getattr(m.properties, "SubscriptionIdentifier", None) if m.properties else None
        msg = Message(m.topic, bytes(m.payload), time.time(), m.qos, bool(m.retain),
                      bool(m.dup), m.mid, tuple(ids) if ids else ())
        if m.qos == 0:
            try:
                self.sink.put_nowait(msg)
            except queue.Full:
                self.metrics.queue_dropped.inc()
            return
        try:
            self.sink.put_nowait(msg)
        except queue.Full:
            # Receive Maximum should make this impossible; wait rather than lose it
            self.metrics.queue_blocked.inc()
            self.sink.put(msg)

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
