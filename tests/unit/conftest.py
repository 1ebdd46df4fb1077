"""Unit tests need no Ray and no network: both fail loudly if a test reaches for them."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest


class NetworkUsedInUnitTest(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_ray_no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise NetworkUsedInUnitTest("unit tests must not open sockets or start Ray")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket.socket, "bind", refuse)
    if "ray" in sys.modules:
        monkeypatch.setattr(sys.modules["ray"], "init", refuse)
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        raise NetworkUsedInUnitTest("a unit test started Ray")
