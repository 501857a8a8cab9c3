"""The intake queue between paho's network thread and the intake worker, and its
admission rule (back-pressure).

Why the network thread never waits without bound, and why the queue never
overflows, whatever the broker does:

* The daemon connects with MQTT 5 *Receive Maximum* ``R`` (``[mqtt]
  receive_maximum``): a broker that keeps to it never has more than ``R`` QoS 1/2
  messages to us unacknowledged, and the intake acknowledges a message only
  after its batch is committed.  So at most ``R`` QoS >= 1 messages are in the
  queue or in the worker's hands at any time, however fast devices publish.
* QoS 0 messages are not flow-controlled by the broker.  They are admitted only
  while the queue holds fewer than ``maxsize - R`` messages (the *QoS 0 share*);
  beyond that they are dropped and counted (:meth:`IntakeQueue.take_dropped`,
  taken by the worker into the ``ignored``/``queue_full`` outcome), as QoS 0
  allows.
* Hence, with a broker that keeps to Receive Maximum, the queue never holds more
  than ``(maxsize - R) + R = maxsize`` items and is never full when a packet is
  read.
* Not every broker keeps to it.  mosquitto before 2.0.13 (Debian 12 ships
  2.0.11) moves up to ``R`` queued messages into flight for *each* PUBACK when it
  drains a backlog (eclipse/mosquitto#2306), so after an outage it sends its
  whole queue as fast as TCP allows.  The network thread therefore reads a
  packet only while the queue has room (:meth:`IntakeQueue.wait_room`); while
  it is full, the thread stops reading but goes on writing (PUBACKs, PINGREQ)
  and waits in slices of ``PAUSE_SLICE_S`` for the worker to make room.  TCP
  flow control then holds the broker back.  No message is refused, nothing is
  re-delivered, the connection stays up.  Only a store stall longer than the
  keepalive with such a broker ends the connection (the PINGRESP waits behind
  unread messages): the broker then re-delivers everything unacknowledged in
  the persistent session, and redeliveries already committed are recognised
  by their fingerprint (:func:`monitor.intake.worker.fingerprint`).

The queue is a deque with one condition variable: a put is an append and, only
when the worker sleeps, a notify; the worker takes a whole batch in one call.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

#: how long the network thread waits for room at a time before it services its writes
#: and keepalive again (while the queue is full; see the module docstring)
PAUSE_SLICE_S = 0.05
#: the longest a put waits for room when the queue is full all the same (only the
#: worker's STOP sentinel, put by another thread, can take the last place)
OVERFLOW_WAIT_S = 0.5


class IntakeQueue:
    """Bounded FIFO of messages (and the worker's STOP sentinel).  Any thread may put;
    one consumer (the intake worker) takes."""

    def __init__(self, maxsize: int, reserved: int = 0) -> None:
        """``reserved``: the part of ``maxsize`` kept for QoS >= 1 messages (the receive
        maximum); QoS 0 messages may use only ``maxsize - reserved``."""
        if maxsize < 1 or not 0 <= reserved < maxsize:
            raise ValueError(f"need 0 <= reserved ({reserved}) < maxsize ({maxsize})")
        self.maxsize = maxsize
        self.qos0_limit = maxsize - reserved
        self._items: collections.deque[object] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = False  # the consumer sleeps in take()
        self._dropped = 0
        #: the most the queue ever held (read by tests and the status page)
        self.high_water = 0

    def qsize(self) -> int:
        return len(self._items)

    def _append(self, item: object) -> None:
        self._items.append(item)
        self.high_water = max(self.high_water, len(self._items))
        if self._waiting:
            self._cond.notify()

    def offer_qos0(self, item: object) -> bool:
        """Enqueue a QoS 0 message if it fits in the QoS 0 share; else count it dropped."""
        with self._cond:
            if len(self._items) >= self.qos0_limit:
                self._dropped += 1
                return False
            self._append(item)
            return True

    def wait_room(self, timeout: float) -> bool:
        """Whether the queue holds fewer than ``maxsize`` items, waiting up to ``timeout``
        seconds for the worker to take some."""
        # the usual answer, read without the lock (a deque's len is atomic): only the
        # network thread adds messages, so room seen here is still there at its put
        # (a STOP put meanwhile is the case MqttLink._deliver bounds)
        if len(self._items) < self.maxsize:
            return True
        with self._cond:
            if len(self._items) < self.maxsize:
                return True
            if timeout <= 0:
                return False
            return self._cond.wait_for(lambda: len(self._items) < self.maxsize, timeout)

    def put_nowait(self, item: object) -> None:
        """Enqueue, or raise :class:`queue.Full` at ``maxsize``."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                raise queue.Full
            self._append(item)

    def put(self, item: object, timeout: float | None = None) -> None:
        """Enqueue, waiting up to ``timeout`` seconds (``None``: forever) for room;
        :class:`queue.Full` when it is still full."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._items) >= self.maxsize:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Full
                self._cond.wait(left if left is None else min(left, 0.05))
            self._append(item)

    def get(self, timeout: float | None = None) -> object:
        """One item (``queue.Queue`` compatible); :class:`queue.Empty` on timeout."""
        got = self.take(1, timeout if timeout is not None else 3.0e7)
        if not got:
            raise queue.Empty
        return got[0]

    def take(self, max_items: int, wait_s: float) -> list[object]:
        """Up to ``max_items`` items; waits up to ``wait_s`` for the first one only."""
        with self._cond:
            if not self._items:
                self._waiting = True
                try:
                    self._cond.wait_for(lambda: bool(self._items), wait_s)
                finally:
                    self._waiting = False
            items = self._items
            n = min(max_items, len(items))
            out = [items.popleft() for _ in range(n)]
            self._cond.notify_all()  # a bounded put may wait for room
            return out

    def take_dropped(self) -> int:
        """QoS 0 messages dropped since the last call (the worker books them)."""
        with self._cond:
            n, self._dropped = self._dropped, 0
            return n
