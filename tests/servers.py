"""Real services for tests: each starts on a free 127.0.0.1 port and is stopped by its owner.

Nothing here assumes a service is already running; binaries come from Debian
packages that ``scripts/install-deps`` installs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self


def mosquitto_user_line() -> str:
    """mosquitto started as root drops to the `mosquitto` user, which cannot read the
    test's private temp dirs (persistence, keys, password files): keep root there."""
    return "user root" if os.geteuid() == 0 else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 15.0,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 30) -> None:
    """Terminate a service process and wait for it; kill it if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def find_binary(name: str, *extra: str) -> str:
    for cand in (shutil.which(name), *extra):
        if cand and Path(cand).exists():
            return cand
    raise RuntimeError(f"{name} is not installed: run scripts/install-deps (as root)")


class ServiceProcess:
    """A service a test starts and stops; ``with service as s:`` starts it and always
    stops it."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Mosquitto(ServiceProcess):
    """A private mosquitto broker.  ``stop()``/``start()`` keep the same port and persistence."""

    workdir: Path
    port: int = 0
    max_queued: int = 0  # 0 = unlimited: benchmarks queue 200k messages for a stopped client
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {self.workdir}/",
                    "autosave_interval 1",
                    f"max_queued_messages {self.max_queued}",
                    "max_queued_bytes 0",
                    "max_inflight_messages 0",
                    "max_packet_size 1048576",
                    "log_dest none",
                    mosquitto_user_line(),
                    "",
                ]
            )
        )

    def start(self) -> Mosquitto:
        binary = find_binary("mosquitto", "/usr/sbin/mosquitto")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def mosquitto(workdir: Path, port: int = 0, max_queued: int = 0) -> Mosquitto:
    """``with mosquitto(dir) as broker:`` -- started, and stopped at the end."""
    return Mosquitto(workdir, port=port, max_queued=max_queued)
