"""Tier planner: moving sequences between a worker's GPU and CPU tiers.

Blocks move per *set* of sequences: a block moves only when every reference to it comes
from the set, so memory shared with anyone else (another sequence, a pin, a block about
to be shared) never moves under them. Bringing a set back to the GPU copies a CPU block
that others still hold instead of moving it; the copy is private to the set and
carries no prefix-cache entry, which stays with the pinned or shared original.

Planning is separate from doing: ``plan_victims`` only reads state, so a caller can
find out that even swapping cannot make room and return OutOfMemory with nothing changed.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Iterable
from dataclasses import dataclass, field

from kvservice.core.block_pool import BlockMeta, BlockPool
from kvservice.core.commands import Command, SwapIn, SwapOut
from kvservice.core.ids import BlockHash, BlockId, Tier, WorkerId
from kvservice.core.policies import EvictionPolicy
from kvservice.core.prefix_cache import move_entry
from kvservice.core.sequence import SeqState


@dataclass(slots=True, eq=False)
class WorkerState:
    worker_id: WorkerId
    gpu: BlockPool
    cpu: BlockPool
    index: dict[BlockHash, BlockMeta]
    eviction: EvictionPolicy
    seqs: dict[int, SeqState] = field(default_factory=dict)
    # Sequences whose ledger record changed; the manager's set, shared by all workers.
    dirty: set[int] = field(default_factory=set)

    def pool(self, tier: Tier) -> BlockPool:
        return self.gpu if tier is Tier.GPU else self.cpu


def unique(seqs: Iterable[SeqState]) -> list[SeqState]:
    return list({id(s): s for s in seqs}.values())


def cpu_blocks_of(seqs: Iterable[SeqState]) -> dict[BlockMeta, int]:
    """Distinct CPU blocks of the sequences -> references from them."""
    refs: dict[BlockMeta, int] = {}
    for seq in seqs:
        if seq.num_cpu_blocks:
            for meta in seq.blocks:
                if meta.tier is Tier.CPU:
                    refs[meta] = refs.get(meta, 0) + 1
    return refs


def plan_victims(
    ws: WorkerState,
    need: int,
    protected: Container[int],
    pinned: Container[int],
    *,
    held: Collection[BlockMeta] = (),
    cpu_reserved: int = 0,
) -> list[SeqState] | None:
    """Coldest sequences whose swap-out leaves ``need`` GPU blocks free or cached.

    ``held`` blocks are about to gain a reference (so they count as shared), and
    ``cpu_reserved`` CPU queue entries are about to be taken. Returns [] if no swap is
    needed and None if even swapping cannot make the room. Only reads state.
    """
    held_queued = sum(1 for m in held if m.tier is Tier.GPU and m.ref_cnt == 0)
    deficit = need - ws.gpu.num_queued + held_queued
    if deficit <= 0:
        return []
    order = (ws.seqs[s] for s in ws.eviction.coldest() if s not in protected and s not in pinned)
    victims, freed = choose_victims(order, deficit, ws.cpu.num_queued - cpu_reserved, held)
    return victims if freed >= deficit else None


def choose_victims(
    order: Iterable[SeqState], deficit: float, cpu_room: int, held: Collection[BlockMeta] = ()
) -> tuple[list[SeqState], int]:
    """Take sequences in order until swapping them out frees ``deficit`` GPU blocks.

    A block is freed once every reference to it comes from the chosen set; a sequence
    whose blocks would overflow the CPU room is skipped. Returns (chosen, blocks freed).
    """
    refs: dict[BlockMeta, int] = {}
    victims: list[SeqState] = []
    freed = 0
    for seq in order:
        if seq.num_cpu_blocks == len(seq.blocks):
            continue
        gpu_blocks = [m for m in seq.blocks if m.tier is Tier.GPU]
        gain = sum(1 for m in gpu_blocks if refs.get(m, 0) + 1 == m.ref_cnt + (m in held))
        if freed + gain > cpu_room:
            continue
        for m in gpu_blocks:
            refs[m] = refs.get(m, 0) + 1
        victims.append(seq)
        freed += gain
        if freed >= deficit:
            break
    return victims, freed


def _move(ws: WorkerState, seqs: list[SeqState], src: Tier, copy_shared: bool) -> list[tuple[BlockId, BlockId]]:
    src_pool = ws.pool(src)
    dst_pool = ws.pool(Tier.CPU if src is Tier.GPU else Tier.GPU)
    refs: dict[BlockMeta, int] = {}
    for seq in seqs:
        for meta in seq.blocks:
            if meta.tier is src:
                refs[meta] = refs.get(meta, 0) + 1
    mapping: dict[BlockMeta, BlockMeta] = {}
    pairs: list[tuple[BlockId, BlockId]] = []
    for meta, n in refs.items():
        moved = n == meta.ref_cnt
        if not moved and not copy_shared:
            continue
        dst = dst_pool.allocate()
        assert dst is not None, "planned room is missing"
        dst.ref_cnt = n
        if moved:
            move_entry(meta, dst, ws.index)
        mapping[meta] = dst
        pairs.append((meta.block_id, dst.block_id))
    # Released last to first, so the freed blocks are reused in ascending order.
    for meta in reversed(mapping):
        src_pool.decref(meta, refs[meta])
    if mapping:
        for seq in seqs:
            for i, meta in enumerate(seq.blocks):
                new = mapping.get(meta)
                if new is not None:
                    seq.set_block(i, new)
                    ws.dirty.add(seq.seq_id)
    return pairs


def swap_out(ws: WorkerState, seqs: Iterable[SeqState]) -> list[Command]:
    """Move the GPU blocks only these sequences hold to CPU (room checked by the caller)."""
    pairs = _move(ws, unique(seqs), Tier.GPU, copy_shared=False)
    return [SwapOut(ws.worker_id, tuple(pairs))] if pairs else []


def swap_in(ws: WorkerState, seqs: Iterable[SeqState]) -> list[Command]:
    """Make the sequences GPU-resident (room checked by the caller)."""
    pairs = _move(ws, unique(seqs), Tier.CPU, copy_shared=True)
    return [SwapIn(ws.worker_id, tuple(pairs))] if pairs else []


def relieve(
    ws: WorkerState,
    protected: Container[int],
    pinned: Container[int],
    high_watermark: float,
    low_watermark: float,
) -> list[Command]:
    """Above the high mark: evict cached blocks, then swap cold sequences, to the low mark."""
    gpu = ws.gpu
    high = int(high_watermark * gpu.num_blocks)
    low = int(low_watermark * gpu.num_blocks)
    if gpu.num_used + gpu.num_cached <= high:
        return []
    gpu.evict_cached(gpu.num_used + gpu.num_cached - low)
    if gpu.num_used <= high:
        return []
    order = (ws.seqs[s] for s in ws.eviction.coldest() if s not in protected and s not in pinned)
    victims, _ = choose_victims(order, gpu.num_used - low, ws.cpu.num_queued)
    return swap_out(ws, victims)
