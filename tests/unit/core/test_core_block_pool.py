"""BlockPool: exact block ids, queue order and eviction order."""

from __future__ import annotations

from kvservice.core.block_pool import BlockMeta, BlockPool
from kvservice.core.ids import BlockHash, Tier, WorkerId


def make_pool(n: int = 4) -> tuple[BlockPool, dict[BlockHash, BlockMeta]]:
    index: dict[BlockHash, BlockMeta] = {}
    return BlockPool(WorkerId(0), Tier.GPU, n, index), index


def cache(pool: BlockPool, meta: BlockMeta, h: int) -> None:
    meta.block_hash = BlockHash(h)
    meta.token_bytes = b"x"
    pool.index[BlockHash(h)] = meta


def ids(pool: BlockPool) -> list[int]:
    return [m.block_id for m in pool.queued()]


def test_allocates_in_id_order_then_reuses_freed_blocks_first() -> None:
    pool, _ = make_pool(4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert a and b and c
    assert [a.block_id, b.block_id, c.block_id] == [0, 1, 2]
    assert pool.decref(b) is True
    assert ids(pool) == [1, 3]
    again = pool.allocate()
    assert again is b and again.ref_cnt == 1
    assert (pool.num_used, pool.num_free, pool.num_cached) == (3, 1, 0)


def test_cached_blocks_queue_behind_free_ones_and_are_evicted_oldest_first() -> None:
    pool, index = make_pool(4)
    blocks = [pool.allocate() for _ in range(4)]
    assert all(blocks) and pool.allocate() is None
    b0, b1, b2, b3 = blocks  # type: ignore[misc]
    cache(pool, b2, 22)
    cache(pool, b0, 20)
    assert pool.decref(b2) is False  # cached, not free
    assert pool.decref(b0) is False
    assert pool.decref(b3) is True
    assert ids(pool) == [3, 2, 0]  # free first, then cached in release order
    assert (pool.num_free, pool.num_cached) == (1, 2)
    assert pool.allocate() is b3
    evicted = pool.allocate()
    assert evicted is b2 and evicted.block_hash is None and 22 not in index
    assert 20 in index and pool.num_cached == 1


def test_incref_revives_a_cached_block_and_keeps_its_hash() -> None:
    pool, index = make_pool(2)
    b0 = pool.allocate()
    assert b0 is not None
    cache(pool, b0, 7)
    pool.decref(b0)
    pool.incref(b0, 2)
    assert b0.ref_cnt == 2 and b0.block_hash == 7 and index[BlockHash(7)] is b0
    assert ids(pool) == [1] and pool.num_cached == 0


def test_uncache_and_evict_cached_move_blocks_to_the_free_head() -> None:
    pool, index = make_pool(4)
    metas = [pool.allocate() for _ in range(4)]
    for h, meta in enumerate(metas):
        assert meta is not None
        cache(pool, meta, 100 + h)
    for meta in (metas[3], metas[1], metas[0], metas[2]):
        assert meta is not None
        pool.decref(meta)
    assert ids(pool) == [3, 1, 0, 2]
    assert pool.evict_cached(2) == 2
    assert ids(pool) == [1, 3, 0, 2] and sorted(index) == [100, 102]
    assert metas[3] is not None and metas[3].block_hash is None
    assert (pool.num_free, pool.num_cached) == (2, 2)
    pool.uncache(metas[2])  # type: ignore[arg-type]
    assert ids(pool) == [2, 1, 3, 0] and sorted(index) == [100]
