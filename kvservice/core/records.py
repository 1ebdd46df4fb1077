"""What a worker keeps per sequence so a restarted coordinator can rebuild its tables.

The coordinator sends these records to the worker that holds the blocks
(``Worker.update_ledger``); ``KVCacheManager.from_ledgers`` turns the records of all
live workers back into page tables, refcounts, pins and the prefix index. Cached blocks
that no sequence holds are not recorded: after a rebuild they are simply free.
Plain dataclasses of ints and strings, so they pickle and map onto any wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvservice.core.ids import BlockHash, BlockId, SeqId, TenantId, Tier


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One logical block: where it lives and, if it is in the prefix cache, its hash."""

    block_id: BlockId
    tier: Tier
    block_hash: BlockHash | None = None


@dataclass(frozen=True, slots=True)
class PinRecord:
    """A pin on the blocks a sequence held when it was pinned.

    ``deadline`` is wall-clock time (``time.time()``) for soft pins, None for hard pins.
    """

    blocks: tuple[BlockRecord, ...]
    hard: bool = True
    deadline: float | None = None
    tokens: tuple[int, ...] = ()  # the sequence's tokens when pinned (re-indexes the blocks)
    num_computed_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SeqRecord:
    """One sequence on one worker. A freed but still pinned sequence has no blocks."""

    seq_id: SeqId
    tenant: TenantId
    tokens: tuple[int, ...]
    blocks: tuple[BlockRecord, ...]
    num_computed_tokens: int = 0
    pin: PinRecord | None = None
    live: bool = True  # False: freed, kept only because its pin still holds blocks
