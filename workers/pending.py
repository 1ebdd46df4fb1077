"""Copies between the tiers that may still be in flight, and waiting on them.

Each swap call adds one entry: its handle and the blocks it reads or writes in each
tier. Before any operation touches a block, the worker waits for the entries that touch
it, in one of two ways:
- ``wait_on_stream``: work about to be queued on a CUDA stream (kernels, device-side
  copies) makes that stream wait for the copy's event, without blocking the host;
- ``wait_on_host``: host code about to read or write pinned memory (exports, imports of
  the CPU tier) blocks until the copy is done.
Entries leave when their copy is done, so the list stays as short as the copies in flight.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvservice.core.ids import Tier


class CopyHandle(Protocol):
    """What the kernels' swap_blocks returns."""

    event: Any

    def wait(self) -> None: ...

    def done(self) -> bool: ...


@dataclass(slots=True)
class _Entry:
    handle: CopyHandle
    blocks: tuple[frozenset[int], frozenset[int]]  # indexed by Tier


class PendingCopies:
    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        self.prune()
        return len(self._entries)

    def add(self, handle: CopyHandle, gpu_blocks: Iterable[int], cpu_blocks: Iterable[int]) -> None:
        if handle.done():
            return
        self._entries.append(_Entry(handle, (frozenset(gpu_blocks), frozenset(cpu_blocks))))

    def prune(self) -> None:
        self._entries = [e for e in self._entries if not e.handle.done()]

    def _touching(self, tier: Tier, blocks: Iterable[int]) -> list[_Entry]:
        self.prune()
        if not self._entries:
            return []
        wanted = set(blocks)
        return [e for e in self._entries if not e.blocks[tier].isdisjoint(wanted)]

    def blocks_in_flight(self, tier: Tier) -> set[int]:
        self.prune()
        return set().union(*(e.blocks[tier] for e in self._entries))

    def wait_on_stream(self, tier: Tier, blocks: Iterable[int], stream: Any) -> None:
        """Order ``stream`` (None = no streams, CPU) after the copies touching ``blocks``."""
        for entry in self._touching(tier, blocks):
            event = entry.handle.event
            if stream is not None and isinstance(event, torch.cuda.Event):
                stream.wait_event(event)
            else:
                entry.handle.wait()
        self.prune()

    def wait_on_host(self, tier: Tier, blocks: Iterable[int]) -> None:
        for entry in self._touching(tier, blocks):
            entry.handle.wait()
        self.prune()

    def wait_all(self) -> None:
        for entry in self._entries:
            entry.handle.wait()
        self._entries.clear()
