"""Shared helpers for the core tests: a small manager and a full state snapshot.

The snapshot reads the manager's internals on purpose: "state unchanged after a failed
call" must cover everything (queue order, refcounts, the index, LRU order, pins,
pending ledger updates), not only what the public views show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvservice.core.commands import PoolSizes
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


def snapshot(m: KVCacheManager) -> Any:
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


@pytest.fixture
def make_manager() -> Callable[..., KVCacheManager]:
    def make(gpu: int = 8, cpu: int = 4, num_workers: int = 1, **options: Any) -> KVCacheManager:
        options.setdefault("high_watermark", 1.0)
        options.setdefault("low_watermark", 1.0)
        sizes = {w: PoolSizes(gpu, cpu) for w in range(num_workers)}
        return KVCacheManager(LAYOUT, sizes, **options)

    return make


@pytest.fixture
def snap() -> Callable[[KVCacheManager], Any]:
    return snapshot
