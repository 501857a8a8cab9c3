"""systemd's service notification protocol (``sd_notify``), spoken directly over the socket.

systemd passes a ``Type=notify`` service the address of a unix datagram socket in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and, with
``WatchdogSec=``, the watchdog interval in ``WATCHDOG_USEC`` (and the main PID in
``WATCHDOG_PID``).  A notification is one datagram of newline-separated
``KEY=value`` assignments: ``READY=1``, ``WATCHDOG=1``, ``STATUS=...``,
``STOPPING=1``.  See sd_notify(3).

There is no silent fallback: without ``NOTIFY_SOCKET`` the daemon is not supervised
and :meth:`Notifier.enabled` is False (nothing is sent, which is the protocol); with
a ``NOTIFY_SOCKET`` that cannot be used, every failure is logged at ERROR (once per
run of failures, and again when sending works again).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the socket named by ``NOTIFY_SOCKET`` in ``environ``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        self.watchdog_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failing = False
        self.sent = 0
        self.errors = 0
        if self.address and not (self.address.startswith(("/", "@"))):
            log.error("NOTIFY_SOCKET=%r is not a unix socket path or @abstract name; "
                      "systemd will not hear from this daemon", self.address)

    @property
    def enabled(self) -> bool:
        """A notification socket is configured (the daemon runs under systemd's eye)."""
        return bool(self.address)

    def notify(self, **fields: str) -> bool:
        """Send one datagram ``KEY=value\\n...``; keys are upper-cased (``ready="1"``).

        Returns True when the datagram was sent.  Without ``NOTIFY_SOCKET`` nothing is
        sent and False is returned; a failure to send is logged at ERROR."""
        if not self.address:
            return False
        lines = []
        for key, value in fields.items():
            # one line per assignment: a newline inside a value would start a new one
            lines.append(f"{key.upper()}={' '.join(str(value).splitlines())}")
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            self._send(data)
        except OSError as exc:
            self.errors += 1
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if not self._failing:
                log.error("cannot notify systemd through NOTIFY_SOCKET=%s: %s "
                          "(the watchdog will restart this daemon if this persists)",
                          self.address, exc)
            self._failing = True
            return False
        if self._failing:
            log.error("notifying systemd through NOTIFY_SOCKET=%s works again", self.address)
            self._failing = False
        self.sent += 1
        return True

    def _send(self, data: bytes) -> None:
        if not self.address.startswith(("/", "@")):
            raise OSError(f"unsupported NOTIFY_SOCKET address {self.address!r}")
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(data, target)

    def ready(self, status: str) -> bool:
        return self.notify(ready="1", status=status)

    def watchdog(self, status: str) -> bool:
        return self.notify(watchdog="1", status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(stopping="1", status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """The watchdog interval in seconds, or None when systemd asked for no watchdog.

    As sd_watchdog_enabled(3): ``WATCHDOG_USEC`` is the interval; a ``WATCHDOG_PID``
    other than ours means the variables were meant for another process."""
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.error("WATCHDOG_USEC=%r is not a number of microseconds; no watchdog pings", raw)
        return None
    if usec <= 0:
        log.error("WATCHDOG_USEC=%r is not positive; no watchdog pings", raw)
        return None
    return usec / 1e6
