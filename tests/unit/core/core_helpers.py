"""Helpers shared by the core tests (imported by name: pytest puts this folder on the path)."""

from __future__ import annotations

from typing import Any

from kvservice.core.commands import CreateResult
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


def create(m: KVCacheManager, tokens: list[int], tenant: str | None = None, **kw: Any) -> int:
    """Create a sequence that must fit; its id."""
    result = m.create(tenant, tokens, **kw)
    assert isinstance(result, CreateResult), result
    return result.seq_id


def snapshot(m: KVCacheManager) -> Any:
    """Everything a failed call must leave as it was: internals included on purpose
    (queue order, refcounts, the index, LRU order, pins, pending ledger updates)."""
    workers = []
    for w, ws in sorted(m._workers.items()):
        pools = []
        for pool in (ws.gpu, ws.cpu):
            metas = [
                (b.block_id, b.ref_cnt, b.block_hash, b.cache_id, b.parent_cache_id, b.token_bytes, b.tenant)
                for b in pool.metas
            ]
            pools.append((metas, [b.block_id for b in pool.queued()], pool.num_cached, pool.num_queued))
        index = sorted((h, b.tier, b.block_id) for h, b in ws.index.items())
        workers.append((w, pools, index, list(ws.eviction.coldest()), sorted(ws.seqs)))
    seqs = [
        (
            sid, s.tenant, s.worker_id, tuple(s.tokens), tuple(s.block_ids), tuple(s.tiers()),
            s.num_cpu_blocks, s.num_computed, tuple(s.hashes),
        )
        for sid, s in sorted(m._seqs.items())
    ]
    pins = [
        (sid, p.worker_id, tuple((b.tier, b.block_id) for b in p.blocks), p.hard, p.deadline)
        for sid, p in sorted(m._pins.pins.items())
    ]
    return (
        workers, seqs, pins, m._next_seq_id, sorted(m._lost), sorted(m._upserts),
        sorted(m._deletes.items()),
    )
