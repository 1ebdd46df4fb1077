"""Moving sequences between workers, and copying cached prefixes to another worker.

Bookkeeping only, like the rest of the core: these functions change a ``KVCacheManager``'s
tables and return what the workers must do as ``TransferBlocks`` (copy blocks from one
worker's pools into another's), which the coordinator runs before any later call on
either worker.

- ``plan_migration`` moves a set of sequences (and their pins) to another worker. Sharing
  inside the set is kept: a block several of them hold is sent once and shared on the
  destination. A block others on the source still hold is copied (the source keeps
  it); a computed full block the destination already caches under the same prefix is
  not sent at all. Prefix-cache entries follow the blocks, so the destination learns
  the prefixes it now holds; the source keeps its blocks as cached when they were.
- ``copy_prefix`` copies the cached blocks of a prompt's prefix from the worker that
  holds the longest one to another, where they become cached blocks that ``create``
  then hits (cross-worker prefix reuse).
- ``place`` says which worker ``create`` will pick (with the ``affinity_load`` policy:
  prefix affinity within a load slack) and whether to copy a prefix there first; ``sharing_groups`` splits a worker's sequences
  into sets that share blocks (a drain moves each set whole); ``plan_rebalance`` picks
  sets to move from the busiest worker to the least busy one.

Room on a destination comes from its free and cached blocks only, never from swapping
its sequences out. Moved blocks keep their tier where the destination has room there
and take the other tier otherwise. Out of room returns ``OutOfMemory``, nothing changed.

The functions read the manager's private state (as ``ledger.rebuild`` does): they are
part of the core, kept apart from ``manager.py`` because only multi-worker set-ups use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvservice.core.block_pool import BlockMeta
from kvservice.core.commands import Command, FreeBlocks, OutOfMemory
from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import BlockHash, BlockId, SeqId, TenantId, Tier, WorkerId
from kvservice.core.pins import Pin
from kvservice.core.planner import WorkerState
from kvservice.core.policies import WorkerCandidate
from kvservice.core.prefix_cache import HashChain, encode_tokens, match_prefix, register
from kvservice.core.sequence import SeqState

if TYPE_CHECKING:
    from kvservice.core.manager import KVCacheManager

BlockMove = tuple[Tier, BlockId, Tier, BlockId]  # (source tier, source block, dest tier, dest block)


@dataclass(frozen=True, slots=True)
class TransferBlocks:
    """Copy whole blocks (all layers) from one worker's pools into another's."""

    src_worker_id: WorkerId
    dst_worker_id: WorkerId
    blocks: tuple[BlockMove, ...]


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``plan_migration`` did: run ``transfer``, then the source may reuse its blocks."""

    src_worker_id: WorkerId
    dst_worker_id: WorkerId
    seq_ids: tuple[SeqId, ...]  # live sequences moved
    pinned_ids: tuple[SeqId, ...]  # pins moved (of live or freed sequences)
    transfer: TransferBlocks
    num_shared_blocks: int  # blocks the destination already cached: not sent
    commands: list[Command] = field(default_factory=list)  # FreeBlocks on the source


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new sequence goes, and the worker to copy its cached prefix from first."""

    worker_id: WorkerId
    copy_from: WorkerId | None = None
    num_copy_blocks: int = 0


@dataclass(slots=True)
class _Chain:
    """One page table (a sequence's, or a pin's) of the set being moved."""

    blocks: list[BlockMeta]
    tenant: TenantId
    tokens: Sequence[int]
    hashes: Sequence[BlockHash | None]  # chain hash of each computed full block


# -- moving sequences -----------------------------------------------------------------


def plan_migration(
    manager: KVCacheManager, seq_ids: Iterable[int], dst_worker_id: int
) -> Migration | OutOfMemory:
    """Move the sequences (all on one worker) and their pins to ``dst_worker_id``."""
    dst = manager._worker(dst_worker_id)
    ids = list(dict.fromkeys(seq_ids))
    if not ids:
        raise InvalidArgument("no sequences to move")
    seqs: list[SeqState] = []
    pins: list[tuple[int, Pin]] = []
    sources: set[int] = set()
    for sid in ids:
        seq, pin = manager._seqs.get(sid), manager._pins.get(sid)
        if seq is None and pin is None:
            manager._seq(sid)  # raises NotFound or DataLoss
        if seq is not None:
            seqs.append(seq)
            sources.add(seq.worker_id)
        if pin is not None:
            pins.append((sid, pin))
            sources.add(pin.worker_id)
    if len(sources) != 1:
        raise InvalidArgument(f"the sequences are on workers {sorted(sources)}; move them per worker")
    src = manager._workers[sources.pop()]
    if src is dst:
        raise InvalidArgument(f"the sequences are on worker {dst.worker_id} already")
    bs = manager.block_size
    chains = [_Chain(s.blocks, s.tenant, s.tokens, s.hashes) for s in seqs]
    chains += [_Chain(p.blocks, p.tenant, p.tokens, [m.block_hash for m in p.blocks]) for _, p in pins]
    refs: dict[BlockMeta, int] = {}
    for chain in chains:
        for meta in chain.blocks:
            refs[meta] = refs.get(meta, 0) + 1
    target = _match_on_destination(dst, chains, bs)
    fresh = [m for m, hit in target.items() if hit is None]
    tiers = _destination_tiers(dst, fresh, {hit for hit in target.values() if hit is not None})
    if tiers is None:
        return OutOfMemory(
            f"worker {dst.worker_id} has no room for {len(fresh)} blocks", dst.worker_id
        )

    # Commit. Reused blocks are taken first: allocating could otherwise evict them.
    mapping: dict[BlockMeta, BlockMeta] = {}
    for meta, hit in target.items():
        if hit is not None:
            dst.pool(hit.tier).incref(hit, refs[meta])
            mapping[meta] = hit
    moves: list[BlockMove] = []
    for meta, tier in zip(fresh, tiers, strict=True):
        new = dst.pool(tier).allocate()
        assert new is not None, "planned room is missing"
        new.ref_cnt = refs[meta]
        mapping[meta] = new
        moves.append((meta.tier, meta.block_id, new.tier, new.block_id))
    for chain in chains:
        _register_chain(dst, chain, mapping, set(fresh), bs)
    for seq in seqs:
        for i, meta in enumerate(seq.blocks):
            seq.set_block(i, mapping[meta])
        seq.worker_id = dst.worker_id
        del src.seqs[seq.seq_id]
        dst.seqs[seq.seq_id] = seq
        src.eviction.remove(seq.seq_id)
        dst.eviction.touch(seq.seq_id)
    for _, pin in pins:
        pin.blocks = [mapping[m] for m in pin.blocks]
        pin.worker_id = dst.worker_id
    freed: dict[Tier, list[BlockId]] = {}
    for meta in reversed(list(refs)):  # so freed blocks are reused in ascending order
        if src.pool(meta.tier).decref(meta, refs[meta]):
            freed.setdefault(meta.tier, []).append(meta.block_id)
    manager._upserts.update(ids)
    return Migration(
        src.worker_id,
        dst.worker_id,
        tuple(SeqId(s.seq_id) for s in seqs),
        tuple(SeqId(sid) for sid, _ in pins),
        TransferBlocks(src.worker_id, dst.worker_id, tuple(moves)),
        len(target) - len(fresh),
        [FreeBlocks(src.worker_id, t, tuple(b)) for t, b in sorted(freed.items())],
    )


def _match_on_destination(
    dst: WorkerState, chains: list[_Chain], bs: int
) -> dict[BlockMeta, BlockMeta | None]:
    """Each source block -> the destination block caching the same prefix, or None.

    A chain's hits are a leading run, as for a prompt lookup: each hit's parent must be
    the previous hit. A block shared by several chains gets the first decision made."""
    target: dict[BlockMeta, BlockMeta | None] = {}
    for chain in chains:
        parent_cache_id = 0
        matching = True
        for i, meta in enumerate(chain.blocks):
            if meta in target:
                hit = target[meta]
            else:
                hit = None
                if matching and i < len(chain.hashes) and chain.hashes[i] is not None:
                    found = dst.index.get(chain.hashes[i])  # type: ignore[arg-type]
                    if (
                        found is not None
                        and found.parent_cache_id == parent_cache_id
                        and found.tenant == chain.tenant
                        and found.token_bytes == encode_tokens(chain.tokens[i * bs : (i + 1) * bs])
                    ):
                        hit = found
                target[meta] = hit
            matching = matching and hit is not None
            parent_cache_id = hit.cache_id if hit is not None else -1
    return target


def _destination_tiers(
    dst: WorkerState, fresh: list[BlockMeta], reused: set[BlockMeta]
) -> list[Tier] | None:
    """The tier each fresh block gets on the destination (its own when there is room)."""
    room = {
        t: dst.pool(t).num_queued - sum(1 for m in reused if m.tier is t and m.ref_cnt == 0)
        for t in (Tier.GPU, Tier.CPU)
    }
    if len(fresh) > room[Tier.GPU] + room[Tier.CPU]:
        return None
    tiers: list[Tier | None] = [None] * len(fresh)
    for i, meta in enumerate(fresh):
        if room[meta.tier] > 0:
            tiers[i] = meta.tier
            room[meta.tier] -= 1
    for i, tier in enumerate(tiers):
        if tier is None:
            other = Tier.GPU if room[Tier.GPU] > 0 else Tier.CPU
            tiers[i] = other
            room[other] -= 1
    return tiers  # type: ignore[return-value]


def _register_chain(
    dst: WorkerState,
    chain: _Chain,
    mapping: dict[BlockMeta, BlockMeta],
    fresh: set[BlockMeta],
    bs: int,
) -> None:
    """Enter the chain's computed blocks that were sent into the destination's index."""
    for i, meta in enumerate(chain.blocks):
        if i >= len(chain.hashes) or chain.hashes[i] is None:
            return
        new = mapping[meta]
        if meta in fresh and new.block_hash is None:
            parent = mapping[chain.blocks[i - 1]] if i else None
            block_bytes = encode_tokens(chain.tokens[i * bs : (i + 1) * bs])
            register(dst.pool(new.tier), new, chain.hashes[i], parent, block_bytes, chain.tenant)  # type: ignore[arg-type]


# -- cross-worker prefix reuse --------------------------------------------------------


def copy_prefix(
    manager: KVCacheManager,
    tenant: str | None,
    tokens: Sequence[int],
    src_worker_id: int,
    dst_worker_id: int,
) -> TransferBlocks | None:
    """Copy the prompt's cached prefix blocks that ``src`` has and ``dst`` lacks to
    ``dst``'s GPU tier, as cached blocks; None if there is nothing to copy or no room
    (the copy only saves work, so it never evicts more than cached blocks)."""
    src, dst = manager._worker(src_worker_id), manager._worker(dst_worker_id)
    tenant_id = manager._tenant(tenant)
    token_list, data = manager._tokens(tokens)
    chain = HashChain(data, manager._salt(tenant_id), manager.block_size)
    max_shared = max(len(token_list) - 1, 0) // manager.block_size
    have = match_prefix(dst.index, chain, tenant_id, max_shared)
    found = match_prefix(src.index, chain, tenant_id, max_shared)
    missing = found[len(have) :]
    held_queued = sum(1 for m in have if m.tier is Tier.GPU and m.ref_cnt == 0)
    if src is dst or not missing or len(missing) > dst.gpu.num_queued - held_queued:
        return None
    for meta in have:  # held while allocating, so that allocation cannot evict them
        dst.pool(meta.tier).incref(meta)
    parent = have[-1] if have else None
    moves: list[BlockMove] = []
    copies: list[BlockMeta] = []
    for i, meta in enumerate(missing, start=len(have)):
        new = dst.gpu.allocate()
        assert new is not None, "checked room is missing"
        copies.append(new)
        if not register(dst.gpu, new, chain.hash(i), parent, chain.block_bytes(i), tenant_id):
            break  # an unreachable entry would be useless; stop the copy here
        moves.append((meta.tier, meta.block_id, new.tier, new.block_id))
        parent = new
    for meta in (*reversed(copies), *have):
        dst.pool(meta.tier).decref(meta)
    if not moves:
        return None
    return TransferBlocks(src.worker_id, dst.worker_id, tuple(moves))


def place(
    manager: KVCacheManager, tenant: str | None, tokens: Sequence[int], *, min_copy_blocks: int = 4
) -> Placement | None:
    """The worker ``create`` would choose for a new sequence (the manager's own placement
    policy), and whether to copy its prefix there first from the worker caching the
    longest one: when that one holds at least ``min_copy_blocks`` more blocks of it.
    After such a copy ``create`` still chooses the same worker (the copies are cached
    blocks, so loads stay as they were, and that worker's prefix is now the longest).
    None with fewer than two workers."""
    if len(manager._workers) < 2:
        return None
    hits = manager.lookup_prefix(tenant, tokens)
    bs = manager.block_size
    candidates = [
        WorkerCandidate(WorkerId(w), hits.get(w, 0), ws.gpu.num_queued, ws.gpu.num_blocks)
        for w, ws in sorted(manager._workers.items())
    ]
    chosen = manager._placement.choose(candidates)
    best = max(candidates, key=lambda c: (c.num_cached_tokens, c.num_available_blocks, -c.worker_id))
    extra = (best.num_cached_tokens - hits.get(chosen, 0)) // bs
    if best.worker_id != chosen and min_copy_blocks >= 1 and extra >= min_copy_blocks:
        return Placement(chosen, best.worker_id, extra)
    return Placement(chosen)


# -- drains and rebalancing -----------------------------------------------------------


def sharing_groups(manager: KVCacheManager, worker_id: int) -> list[list[int]]:
    """The worker's sequences and pins, in sets that share blocks, largest set first."""
    ws = manager._worker(worker_id)
    holders: dict[int, list[BlockMeta]] = {sid: list(s.blocks) for sid, s in ws.seqs.items()}
    for sid in manager._pins.on_worker(worker_id):
        pin = manager._pins.get(sid)
        assert pin is not None
        holders.setdefault(sid, []).extend(pin.blocks)
    parent = {sid: sid for sid in holders}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_holder: dict[int, int] = {}
    for sid, metas in holders.items():
        for meta in metas:
            other = first_holder.setdefault(id(meta), sid)
            if other != sid:
                parent[root(sid)] = root(other)
    groups: dict[int, list[int]] = {}
    for sid in sorted(holders):
        groups.setdefault(root(sid), []).append(sid)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def group_blocks(manager: KVCacheManager, seq_ids: Iterable[int]) -> int:
    """Distinct blocks (either tier) the listed sequences and pins hold."""
    metas: set[int] = set()
    for sid in seq_ids:
        seq, pin = manager._seqs.get(sid), manager._pins.get(sid)
        metas.update(id(m) for m in (seq.blocks if seq else ()))
        metas.update(id(m) for m in (pin.blocks if pin else ()))
    return len(metas)


def load(manager: KVCacheManager, worker_id: int) -> float:
    """Share of the worker's GPU tier that sequences and pins hold."""
    gpu = manager._worker(worker_id).gpu
    return gpu.num_used / gpu.num_blocks


def plan_rebalance(
    manager: KVCacheManager, *, threshold: float = 0.2, exclude: Iterable[int] = ()
) -> tuple[int, int, list[list[int]]] | None:
    """(busiest worker, least busy worker, sets of sequences to move) when their loads
    differ by more than ``threshold``; None otherwise. Sets are taken coldest first while
    they fit in half the difference, and pinned sequences stay where their pin put them."""
    skip = set(exclude)
    loads = {w: load(manager, w) for w in manager._workers if w not in skip}
    if len(loads) < 2:
        return None
    busiest = max(loads, key=lambda w: (loads[w], -w))
    idlest = min(loads, key=lambda w: (loads[w], w))
    if loads[busiest] - loads[idlest] <= threshold:
        return None
    src, dst = manager._workers[busiest].gpu, manager._workers[idlest].gpu
    # x blocks moved even the loads out: (u_s - x) / n_s == (u_d + x) / n_d
    budget = (src.num_used * dst.num_blocks - dst.num_used * src.num_blocks) / (
        src.num_blocks + dst.num_blocks
    )
    coldness = {sid: i for i, sid in enumerate(manager._workers[busiest].eviction.coldest())}
    groups = [
        g for g in sharing_groups(manager, busiest) if not any(s in manager._pins for s in g)
    ]
    groups.sort(key=lambda g: min(coldness.get(s, len(coldness)) for s in g))
    chosen: list[list[int]] = []
    moved = 0
    for group in groups:
        size = group_blocks(manager, group)
        if moved + size <= budget:
            chosen.append(group)
            moved += size
    return (busiest, idlest, chosen) if chosen else None
