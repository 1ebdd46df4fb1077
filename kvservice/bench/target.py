"""The server a bench command drives: a running one (``--address``), or its own.

Its own is a ``ServerThread`` on 127.0.0.1 (a free port) serving a coordinator over CPU
workers embedded in this process, so the bench can also look inside: check the
coordinator's invariants after a call, or read its usage without a round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvservice.coordinator import Coordinator
from kvservice.server import ServerThread
from kvservice.transport_embedded import build_embedded


@dataclass
class Target:
    """Where to send calls; ``coordinator`` is None for a server that is not ours."""

    address: str
    token: str | None = None
    coordinator: Coordinator | None = None
    _server: ServerThread | None = None
    _build: Callable[[], Coordinator] | None = field(default=None, repr=False)

    @property
    def own(self) -> bool:
        return self.coordinator is not None

    def fresh_service(self) -> None:
        """Serve a brand-new coordinator from now on (our own server only)."""
        if self._server is None or self._build is None:
            raise RuntimeError("only our own server can be given a fresh service")
        old, self.coordinator = self.coordinator, self._build()
        self._server.attach(self.coordinator)
        if old is not None:
            old.close()


def embedded_service(
    layout: str = "tiny",
    *,
    block_size: int = 4,
    num_workers: int = 1,
    num_gpu_blocks: int = 64,
    num_cpu_blocks: int = 64,
    **options: Any,
) -> Coordinator:
    """A coordinator over CPU workers in this process (small pools: limits are reached)."""
    return build_embedded(
        layout,
        device="cpu",
        block_size=block_size,
        num_workers=num_workers,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=num_cpu_blocks,
        **options,
    )


@contextmanager
def open_target(
    address: str | None = None,
    *,
    token: str | None = None,
    build: Callable[[], Coordinator] = embedded_service,
) -> Iterator[Target]:
    """``address`` as a Target, or our own server (``build()`` makes its coordinator)."""
    if address is not None:
        yield Target(address, token)
        return
    coordinator = build()
    try:
        with ServerThread(coordinator, host="127.0.0.1", port=0) as server:
            target = Target(server.address, None, coordinator, server, build)
            try:
                yield target
            finally:
                coordinator = target.coordinator or coordinator
    finally:
        coordinator.close()
