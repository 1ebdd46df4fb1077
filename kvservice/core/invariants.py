"""Full consistency check of the core's bookkeeping; O(everything), for tests only.

Checked: each pool's blocks are used + cached + free == total, with the free queue
holding exactly the refcount-0 blocks (free ones ahead of cached ones); every refcount
equals page-table references plus pin references; every block object belongs to exactly
one (worker, tier) slot; page tables match token counts; the prefix index maps each
hash to exactly the block that carries it, and each sequence's hashed blocks hold its
own tokens and tenant.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping

from kvservice.core.ids import Tier
from kvservice.core.pins import PinTable
from kvservice.core.planner import WorkerState
from kvservice.core.sequence import SeqState


def check_manager(
    workers: Mapping[int, WorkerState],
    seqs: Mapping[int, SeqState],
    pins: PinTable,
    block_size: int,
) -> None:
    owner: dict[int, tuple[int, Tier]] = {}
    for worker_id, ws in workers.items():
        for pool in (ws.gpu, ws.cpu):
            for i, meta in enumerate(pool.metas):
                assert meta.block_id == i and meta.tier is pool.tier, f"misnumbered block {meta}"
                assert id(meta) not in owner, f"block {i} in two places"
                owner[id(meta)] = (worker_id, pool.tier)
            _check_pool_queue(ws, pool.tier)
    refs: dict[int, int] = {}
    for seq_id, seq in seqs.items():
        ws = workers[seq.worker_id]
        assert ws.seqs.get(seq_id) is seq, f"sequence {seq_id} not on its worker"
        _check_seq(ws, seq, block_size, owner)
        for meta in seq.blocks:
            refs[id(meta)] = refs.get(id(meta), 0) + 1
    for ws in workers.values():
        assert set(ws.seqs) <= set(seqs), "worker lists a dead sequence"
    for seq_id, pin in pins.pins.items():
        for meta in pin.blocks:
            assert owner.get(id(meta), (None,))[0] == pin.worker_id, f"pin {seq_id} off its worker"
            refs[id(meta)] = refs.get(id(meta), 0) + 1
    for ws in workers.values():
        for pool in (ws.gpu, ws.cpu):
            for meta in pool.metas:
                expected = refs.get(id(meta), 0)
                assert meta.ref_cnt == expected, (
                    f"worker {ws.worker_id} {pool.tier.name} block {meta.block_id}: "
                    f"refcount {meta.ref_cnt} != {expected} table+pin references"
                )
        for block_hash, meta in ws.index.items():
            assert meta.block_hash == block_hash, "index entry under the wrong hash"
            assert owner.get(id(meta), (None,))[0] == ws.worker_id, "index entry off its worker"
        hashed = [m for p in (ws.gpu, ws.cpu) for m in p.metas if m.block_hash is not None]
        assert len(hashed) == len(ws.index), "a hashed block is missing from the index"


def _check_pool_queue(ws: WorkerState, tier: Tier) -> None:
    pool = ws.pool(tier)
    queued = pool.queued()
    assert len(queued) == pool.num_queued == len({id(m) for m in queued}), "queue count"
    assert all(m.ref_cnt == 0 for m in queued), "a used block is in the free queue"
    zero = sum(1 for m in pool.metas if m.ref_cnt == 0)
    assert zero == len(queued), "a refcount-0 block is missing from the free queue"
    cached = [m.block_hash is not None for m in queued]
    assert sum(cached) == pool.num_cached, "cached count"
    assert cached == sorted(cached), "a free block sits behind a cached one"
    assert pool.num_used + pool.num_cached + pool.num_free == pool.num_blocks, "ledger sum"
    for meta in pool.metas:
        if meta.ref_cnt:
            assert meta.prev is None and meta.next is None, "a used block is linked"


def _check_seq(
    ws: WorkerState, seq: SeqState, block_size: int, owner: dict[int, tuple[int, Tier]]
) -> None:
    n = len(seq.tokens)
    assert len(seq.blocks) == -(-n // block_size), f"sequence {seq.seq_id}: block count"
    assert seq.block_ids == [m.block_id for m in seq.blocks], "block_ids out of step"
    assert len({id(m) for m in seq.blocks}) == len(seq.blocks), "a block twice in one table"
    assert seq.num_cpu_blocks == sum(m.tier is Tier.CPU for m in seq.blocks), "cpu count"
    for meta in seq.blocks:
        assert owner.get(id(meta)) == (ws.worker_id, meta.tier), "block off its worker"
    assert 0 <= seq.num_computed <= n, "computed past the end"
    assert len(seq.hashes) <= seq.num_computed // block_size, "hash of an uncomputed block"
    for i, block_hash in enumerate(seq.hashes):
        held = seq.blocks[i]
        assert held.block_hash in (None, block_hash), f"block {held.block_id}: foreign hash"
    for i, meta in enumerate(seq.blocks):
        if meta.block_hash is not None:
            chunk = array("Q", seq.tokens[i * block_size : (i + 1) * block_size]).tobytes()
            assert meta.token_bytes is not None and meta.token_bytes.startswith(chunk), (
                f"cached block {meta.block_id} holds other tokens than sequence {seq.seq_id}"
            )
            assert meta.tenant == seq.tenant, f"cached block {meta.block_id} of another tenant"
