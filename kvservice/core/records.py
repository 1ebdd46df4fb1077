"""What a worker keeps per sequence so a restarted coordinator can rebuild its tables.

The coordinator sends these records to the worker that holds the blocks
(``Worker.update_ledger``); ``KVCacheManager.from_ledgers`` turns the records of all
live workers back into page tables, refcounts, pins and the prefix index. Cached blocks
that no sequence holds are not recorded: after a rebuild they are simply free.
A record the worker holds is then kept current by ``RecordDelta``s (what changed since
it was sent), so a decode step does not re-send every sequence's tokens and blocks.
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


@dataclass(frozen=True, slots=True)
class RecordDelta:
    """Changes to live, unpinned records a worker already holds, one entry per sequence
    in parallel tuples (a decode step changes hundreds of records by a token each).

    Entry ``i`` turns the held record of ``seq_ids[i]`` into one whose tokens are its first
    ``num_tokens[i]`` followed by ``new_tokens[i]``, whose blocks are its first
    ``num_blocks[i]`` followed by ``new_blocks[i]``, and whose computed count is
    ``num_computed_tokens[i]``; tenant, pin (none) and liveness stay. Folding it gives
    exactly the record ``build_record`` makes of the sequence at the same moment.
    """

    seq_ids: tuple[int, ...]
    num_tokens: tuple[int, ...]
    new_tokens: tuple[tuple[int, ...], ...]
    num_blocks: tuple[int, ...]
    new_blocks: tuple[tuple[BlockRecord, ...], ...]
    num_computed_tokens: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.seq_ids)
