from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import STARTED
from tests.servers import Mosquitto, mosquitto


@pytest.fixture(autouse=True)
def _no_daemon_survives_its_test() -> Iterator[None]:
    yield
    while STARTED:
        STARTED.pop().kill()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, stopped after the test."""
    with mosquitto(tmp_path / "mosquitto") as b:
        yield b
