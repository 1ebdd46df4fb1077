"""One block pool per (worker, tier): per-block metadata and the free queue.

Every block is in exactly one of three states:
  used    ref_cnt > 0                       (held by page tables and/or pins)
  cached  ref_cnt == 0, block_hash set      (in the free queue, evictable, LRU order)
  free    ref_cnt == 0, no block_hash       (in the free queue)
The free queue is a doubly linked list threaded through the metadata itself, so every
operation is O(1) and allocates nothing. Free blocks sit at the head and cached blocks
behind them, oldest first: popping the head therefore takes a free block while one
exists and only then evicts the least recently released cached block.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvservice.core.ids import BlockHash, BlockId, TenantId, Tier, WorkerId


@dataclass(slots=True, eq=False)
class BlockMeta:
    """Metadata of one physical block. Compared and hashed by identity."""

    block_id: BlockId
    tier: Tier
    ref_cnt: int = 0
    # Prefix-cache entry (all None/0 unless the block is in the worker's prefix index).
    block_hash: BlockHash | None = None
    cache_id: int = 0  # unique per registration: children name their parent by it
    parent_cache_id: int = 0
    token_bytes: bytes | None = None  # compared on every hit: a hash collision is a miss
    tenant: TenantId | None = None
    # Free-queue links; both None while the block is used.
    prev: BlockMeta | None = None
    next: BlockMeta | None = None

    def clear_cache_entry(self) -> None:
        self.block_hash = None
        self.cache_id = 0
        self.parent_cache_id = 0
        self.token_bytes = None
        self.tenant = None


class BlockPool:
    """Blocks of one (worker, tier). ``index`` is the worker's prefix index (shared by
    both of its tiers); the pool drops an entry from it when it evicts a cached block."""

    def __init__(
        self,
        worker_id: WorkerId,
        tier: Tier,
        num_blocks: int,
        index: dict[BlockHash, BlockMeta],
    ) -> None:
        self.worker_id = worker_id
        self.tier = tier
        self.index = index
        self.metas = [BlockMeta(BlockId(i), tier) for i in range(num_blocks)]
        # Sentinels keep the link code branch-free.
        self._head = BlockMeta(BlockId(-1), tier)
        self._tail = BlockMeta(BlockId(-1), tier)
        self._head.next = self._tail
        self._tail.prev = self._head
        self.num_queued = 0
        self.num_cached = 0
        for meta in reversed(self.metas):
            self._push_front(meta)

    # -- counts ---------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.metas)

    @property
    def num_used(self) -> int:
        return len(self.metas) - self.num_queued

    @property
    def num_free(self) -> int:
        return self.num_queued - self.num_cached

    # -- queue links ----------------------------------------------------------------

    def _push_front(self, meta: BlockMeta) -> None:
        first = self._head.next
        assert first is not None
        meta.prev, meta.next = self._head, first
        self._head.next = first.prev = meta
        self.num_queued += 1

    def _push_back(self, meta: BlockMeta) -> None:
        last = self._tail.prev
        assert last is not None
        meta.prev, meta.next = last, self._tail
        last.next = self._tail.prev = meta
        self.num_queued += 1

    def _unlink(self, meta: BlockMeta) -> None:
        prev, nxt = meta.prev, meta.next
        assert prev is not None and nxt is not None, "block is not in the free queue"
        prev.next, nxt.prev = nxt, prev
        meta.prev = meta.next = None
        self.num_queued -= 1

    def queued(self) -> list[BlockMeta]:
        """The free queue, head first (free blocks, then cached blocks oldest first)."""
        out = []
        node = self._head.next
        while node is not self._tail:
            assert node is not None
            out.append(node)
            node = node.next
        return out

    # -- allocation -----------------------------------------------------------------

    def allocate(self) -> BlockMeta | None:
        """Take the head of the queue with ref_cnt 1, evicting it if it was cached."""
        meta = self._head.next
        if meta is self._tail:
            return None
        assert meta is not None
        self._unlink(meta)
        if meta.block_hash is not None:
            self.num_cached -= 1
            self._forget(meta)
        meta.ref_cnt = 1
        return meta

    def incref(self, meta: BlockMeta, n: int = 1) -> None:
        """Add n references; a cached block leaves the queue and keeps its hash."""
        if meta.ref_cnt == 0:
            self._unlink(meta)
            if meta.block_hash is not None:
                self.num_cached -= 1
        meta.ref_cnt += n

    def decref(self, meta: BlockMeta, n: int = 1) -> bool:
        """Drop n references; True if the block became free (not kept as cached)."""
        meta.ref_cnt -= n
        assert meta.ref_cnt >= 0, "refcount below zero"
        if meta.ref_cnt:
            return False
        if meta.block_hash is None:
            self._push_front(meta)
            return True
        self._push_back(meta)
        self.num_cached += 1
        return False

    def uncache(self, meta: BlockMeta) -> None:
        """Remove a block from the prefix cache; a queued one moves to the free head."""
        if meta.block_hash is None:
            return
        queued = meta.prev is not None
        if queued:
            self._unlink(meta)
            self.num_cached -= 1
        self._forget(meta)
        if queued:
            self._push_front(meta)

    def _forget(self, meta: BlockMeta) -> None:
        assert meta.block_hash is not None
        if self.index.get(meta.block_hash) is meta:
            del self.index[meta.block_hash]
        meta.clear_cache_entry()

    def evict_cached(self, num_blocks: int) -> int:
        """Drop up to num_blocks cached blocks, least recently released first."""
        evicted = 0
        node = self._head.next
        while evicted < num_blocks and node is not self._tail:
            assert node is not None
            nxt = node.next
            if node.block_hash is not None:
                self.uncache(node)
                evicted += 1
            node = nxt
        return evicted
