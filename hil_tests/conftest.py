"""Fixtures shared by every suite: a real Mosquitto broker on a free 127.0.0.1 port; and the
`--hil-port` option that points hil_tests/hil at a real board."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.mosquitto import Mosquitto, MosquittoError, find_mosquitto

# MicroPython files: hil_tests/firmware/mp_runner.py runs them on the unix port, not pytest.
collect_ignore_glob = ["firmware/mp/*", "tools/mesh_stub/*"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--hil-port",
        default=None,
        help="a real board's serial port (/dev/serial/by-id/...) for hil_tests/hil's `real` target",
    )


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except MosquittoError as exc:
        pytest.skip(f"needs a Mosquitto broker: {exc}")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running broker (anonymous, persistent) that the test may stop, restart or kill."""
    _require_mosquitto()
    with Mosquitto(workdir=tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers with options (users=, acl=, tls=, extra_config=); all stopped at teardown."""
    _require_mosquitto()
    brokers: list[Mosquitto] = []

    def start(**options: Any) -> Mosquitto:
        broker = Mosquitto(workdir=tmp_path / f"mosquitto-{len(brokers)}", **options)
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.close()
