"""Values that cross the core boundary: worker commands and call results.

Commands are the only way core decisions reach memory. A list of commands must be run
in list order: a swap-out that empties a GPU block can precede a swap-in that refills
it within one call. Results are plain frozen dataclasses so they can be pickled for Ray
or mapped onto protobuf at the edge without the core knowing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvservice.core.ids import BlockId, SeqId, TenantId, Tier, WorkerId


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """Blocks one worker offers per tier."""

    num_gpu_blocks: int
    num_cpu_blocks: int = 0


@dataclass(frozen=True, slots=True)
class CopyBlocks:
    """Copy whole GPU blocks on one worker (copy-on-write); pairs are (src, dst)."""

    worker_id: WorkerId
    pairs: tuple[tuple[BlockId, BlockId], ...]


@dataclass(frozen=True, slots=True)
class SwapOut:
    """Copy GPU blocks to CPU blocks on one worker; pairs are (gpu_block, cpu_block)."""

    worker_id: WorkerId
    pairs: tuple[tuple[BlockId, BlockId], ...]


@dataclass(frozen=True, slots=True)
class SwapIn:
    """Copy CPU blocks to GPU blocks on one worker; pairs are (cpu_block, gpu_block)."""

    worker_id: WorkerId
    pairs: tuple[tuple[BlockId, BlockId], ...]


@dataclass(frozen=True, slots=True)
class FreeBlocks:
    """Blocks that no sequence, pin or cache entry holds any more (informational)."""

    worker_id: WorkerId
    tier: Tier
    block_ids: tuple[BlockId, ...]


Command = CopyBlocks | SwapOut | SwapIn | FreeBlocks


@dataclass(frozen=True, slots=True)
class OutOfMemory:
    """Not enough blocks even after evicting cached blocks and swapping; nothing changed."""

    reason: str
    worker_id: WorkerId | None = None


@dataclass(frozen=True, slots=True)
class CreateResult:
    seq_id: SeqId
    worker_id: WorkerId
    num_cached_tokens: int
    commands: list[Command] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StepResult:
    commands: list[Command] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WritePlan:
    """GPU slots (block_id * block_size + offset) for positions [start, end)."""

    worker_id: WorkerId
    slots: list[int]
    commands: list[Command] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """GPU block tables of the listed sequences, in the order given, all on one worker."""

    worker_id: WorkerId
    block_tables: list[list[int]]
    seq_lens: list[int]
    commands: list[Command] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """One decode step in one call: append one token each, then slots and block tables.

    ``slots[i]`` is where sequence i's new token's K/V goes; the tables include it.
    """

    worker_id: WorkerId
    block_tables: list[list[int]]
    seq_lens: list[int]
    slots: list[int]
    commands: list[Command] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SeqView:
    """A snapshot of one sequence (copies; mutating it changes nothing)."""

    seq_id: SeqId
    tenant: TenantId
    worker_id: WorkerId
    num_tokens: int
    tokens: list[int]
    block_ids: list[int]
    tiers: list[Tier]
    num_computed_tokens: int = 0
    pinned: str | None = None  # "hard", "soft" or None


@dataclass(frozen=True, slots=True)
class TierUsage:
    """Blocks of one (worker, tier): used (refcount > 0) + cached + free == total."""

    total: int
    used: int
    cached: int
    free: int
