"""Publication over MQTT, after the commit: the SPEC order message and the devices' commands.

:meth:`Publisher.publish_pending` sends every live order whose ``publish_due``
is set and due, and clears ``publish_due`` only once the broker acknowledged
every message of the order (QoS 1 PUBACK), so a crash between the commit and
the publication, or a broker outage, re-sends on the next call: at least once,
never lost.  A re-send or a late publication addresses only the meters its
order still holds, so an old ``OFF`` can never overtake a newer ``ON``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence

from monitor.act import repo
from monitor.act.model import NO_METER, ActionsError, Order, Publish, device_command, dumps
from monitor.config import Config
from monitor.intake.mqtt import MqttError, orders_topic

log = logging.getLogger(__name__)

#: how long publish_pending waits for the broker's PUBACKs of one order
ACK_TIMEOUT_S = 5.0
#: a publication that failed (broker down) is tried again after this long
PUBLISH_RETRY_S = 10.0


class Publisher:
    """Publishes committed orders.  Thread-safe (one publication round at a time).

    ``publish(topic, payload, qos, retain)`` is :meth:`monitor.intake.mqtt.MqttLink.publish`
    (``None``: record only, e.g. in a CLI process; the daemon publishes later).
    ``connected()``, when given, gates publishing: while it is False nothing is
    handed to the client (paho would queue duplicates in memory).
    """

    def __init__(
        self,
        config: Config,
        publish: Publish | None,
        *,
        clock: Callable[[], float] = time.time,
        connected: Callable[[], bool] | None = None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        retry_s: float = PUBLISH_RETRY_S,
    ) -> None:
        self.config = config
        self.cfg = config.actions
        self.publish = publish
        self.clock = clock
        self.connected = connected
        self.ack_timeout_s = ack_timeout_s
        self.retry_s = retry_s
        self.topic = orders_topic(config.site.id)
        self._meters = {m.id: m for m in config.meters}
        self._lock = threading.Lock()

    def messages(self, o: Order, meters: Sequence[str]) -> list[tuple[str, str]]:
        """The MQTT messages of one (re-)publication: the SPEC order JSON on the site's
        orders topic, then each held meter's device command."""
        out = [(self.topic, dumps(o.payload(meters, attempt=o.resends + 1)))]
        for m in meters:
            mc = self._meters.get(m)
            if mc is not None and mc.control is not None:
                out.append(device_command(mc.control, m, not o.off, o.order_id))
        return out

    def publish_pending(self, conn: sqlite3.Connection, now: float | None = None) -> int:
        """Publish every live order whose publication is due; returns how many went out.

        Must run outside any transaction (only committed orders are published).
        An order is marked published only when the broker acknowledged all its
        messages; otherwise it is tried again ``retry_s`` later.  Publishes nothing
        in dry-run mode, without a ``publish`` callable, or while ``connected()``
        says the link is down.  Serialised across threads.
        """
        if conn.in_transaction:
            raise ActionsError("publish_pending() must run after the commit, outside a transaction")
        publish = self.publish
        if self.cfg.mode == "dry_run" or publish is None:
            return 0
        if self.connected is not None and not self.connected():
            return 0
        sent = 0
        with self._lock:
            if self.config.meter_patterns:  # the controls of meters patterns configure
                self._meters.update(self.config.pattern_meters(repo.meter_devices(conn)))
            t = self.clock() if now is None else now
            due = repo.publication_due(conn, t)
            if not due:
                return 0
            owners = repo.owners(conn, dry_run=False)
            for o in due:
                mine = [m for m in o.meters if owners.get(m) == o.order_id]
                held = bool(mine) or (not o.meters and owners.get(NO_METER) == o.order_id)
                if not held:
                    # a later order took all its meters: publishing it now would undo that
                    repo.mark_published(conn, o, None)
                    continue
                if self._send(publish, self.messages(o, mine)):
                    repo.mark_published(conn, o, self.clock() if now is None else now)
                    sent += 1
                else:
                    repo.postpone_publication(conn, o, t + self.retry_s)
        return sent

    def _send(self, publish: Publish, messages: Sequence[tuple[str, str]]) -> bool:
        """Hand ``messages`` to the client and wait for every PUBACK (``ack_timeout_s``
        in all); ``False`` when one could not be handed over or was not acknowledged."""
        infos: list[object] = []
        for topic, payload in messages:
            try:
                infos.append(publish(topic, payload, 1, False))
            except (MqttError, OSError, RuntimeError, ValueError) as exc:
                log.warning("publishing to %s failed (%s); retrying in %.0f s", topic, exc,
                            self.retry_s)
                return False
        until = time.monotonic() + self.ack_timeout_s
        for info in infos:
            wait = getattr(info, "wait_for_publish", None)
            if not callable(wait):
                continue
            try:
                wait(max(0.0, until - time.monotonic()))
            except (RuntimeError, ValueError) as exc:  # paho: not queued (no connection)
                log.warning("order message not acknowledged (%s); retrying in %.0f s", exc,
                            self.retry_s)
                return False
            done = getattr(info, "is_published", None)
            if callable(done) and not done():
                log.warning("broker did not acknowledge an order message within %.0f s; "
                            "retrying in %.0f s", self.ack_timeout_s, self.retry_s)
                return False
        return True
