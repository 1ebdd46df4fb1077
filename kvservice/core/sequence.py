"""Per-sequence state: tokens and the page table (logical block -> physical block).

``blocks`` and ``block_ids`` are kept in step: the metadata gives the tier and refcount,
the plain id list makes a block table one C-level list copy on the decode hot path.
``hashes`` holds the chain hash of each full block whose K/V is computed, in order;
those blocks' contents never change while the hash is listed.

The ``ledger_*`` fields say what the worker's ledger already holds of this sequence's
record (``kvservice.core.ledger``): the worker it was sent to (-1: none, a whole record
goes next), how many leading tokens and blocks of it still match, and the ledger epoch
it was sent under. Everything that
cuts tokens or replaces, cuts or re-hashes a block lowers those marks, so the next
update sends only what lies past them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvservice.core.block_pool import BlockMeta
from kvservice.core.ids import BlockHash, SeqId, TenantId, Tier, WorkerId


@dataclass(slots=True, eq=False)
class SeqState:
    seq_id: SeqId
    tenant: TenantId
    worker_id: WorkerId
    tokens: list[int]
    blocks: list[BlockMeta] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # plain ints: copied per step
    num_cpu_blocks: int = 0
    num_computed: int = 0
    hashes: list[BlockHash] = field(default_factory=list)
    ledger_worker: int = -1
    ledger_tokens: int = 0
    ledger_blocks: int = 0
    ledger_epoch: int = 0

    def add_block(self, meta: BlockMeta) -> None:
        self.blocks.append(meta)
        self.block_ids.append(meta.block_id)
        if meta.tier is Tier.CPU:
            self.num_cpu_blocks += 1

    def set_block(self, i: int, meta: BlockMeta) -> None:
        old = self.blocks[i]
        self.num_cpu_blocks += (meta.tier is Tier.CPU) - (old.tier is Tier.CPU)
        self.blocks[i] = meta
        self.block_ids[i] = meta.block_id
        if i < self.ledger_blocks:
            self.ledger_blocks = i

    def block_changed(self, i: int) -> None:
        """Block ``i`` entered or left the prefix cache (its recorded hash changed)."""
        if i < self.ledger_blocks:
            self.ledger_blocks = i

    def cut_tokens(self, num_tokens: int) -> None:
        del self.tokens[num_tokens:]
        if num_tokens < self.ledger_tokens:
            self.ledger_tokens = num_tokens

    def cut_blocks(self, num_blocks: int) -> list[BlockMeta]:
        """Drop blocks from num_blocks on; returns them (the caller releases them)."""
        dropped = self.blocks[num_blocks:]
        del self.blocks[num_blocks:]
        del self.block_ids[num_blocks:]
        if num_blocks < self.ledger_blocks:
            self.ledger_blocks = num_blocks
        self.num_cpu_blocks -= sum(1 for m in dropped if m.tier is Tier.CPU)
        return dropped

    def tiers(self) -> list[Tier]:
        return [m.tier for m in self.blocks]
