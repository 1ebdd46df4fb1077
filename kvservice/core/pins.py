"""Pins: extra references that keep a sequence's blocks where they are.

A pin holds one reference on every block the sequence had when it was pinned, so a
pinned block is never evicted, never moved between tiers, and a write into it copies it
first. A pinned sequence is also never chosen to swap out. Hard pins last until unpinned
(even past ``free``: pinning a system prompt and freeing the sequence keeps its blocks
cached); soft pins end by themselves at their deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvservice.core.block_pool import BlockMeta
from kvservice.core.ids import TenantId, WorkerId


@dataclass(slots=True, eq=False)
class Pin:
    worker_id: WorkerId
    blocks: list[BlockMeta]
    hard: bool
    deadline: float | None  # clock time for soft pins
    # What the blocks held when pinned, so a freed sequence's pin can still be recorded
    # in the ledger and its cached blocks re-indexed after a coordinator restart.
    tenant: TenantId
    tokens: tuple[int, ...]
    num_computed: int


class PinTable:
    def __init__(self) -> None:
        self.pins: dict[int, Pin] = {}
        self._next_deadline = math.inf

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.pins

    def __len__(self) -> int:
        return len(self.pins)

    def get(self, seq_id: int) -> Pin | None:
        return self.pins.get(seq_id)

    def add(self, seq_id: int, pin: Pin) -> Pin | None:
        """Set the sequence's pin; returns the one it replaces (its refs still held)."""
        old = self.pins.get(seq_id)
        self.pins[seq_id] = pin
        if pin.deadline is not None:
            self._next_deadline = min(self._next_deadline, pin.deadline)
        return old

    def pop(self, seq_id: int) -> Pin | None:
        return self.pins.pop(seq_id, None)

    def due(self, now: float) -> list[int]:
        """Soft pins whose deadline has passed (cheap when none can be)."""
        if now < self._next_deadline:
            return []
        due = [s for s, p in self.pins.items() if p.deadline is not None and p.deadline <= now]
        self._next_deadline = min(
            (p.deadline for s, p in self.pins.items() if p.deadline is not None and s not in due),
            default=math.inf,
        )
        return due

    def on_worker(self, worker_id: int) -> list[int]:
        return [s for s, p in self.pins.items() if p.worker_id == worker_id]
