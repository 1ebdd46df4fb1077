"""State and shared steps behind KVCacheManager (see manager.py for the API).

Every mutating call follows the same two phases so that a failed call changes nothing:
validate and plan (read-only: arguments, then how many GPU blocks the call needs and
which cold sequences would have to swap out), then commit (swap out, swap in, copy on
write, allocate), which cannot fail because the plan reserved the room.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence

from kvservice.core.block_pool import BlockMeta, BlockPool
from kvservice.core.commands import Command, CopyBlocks, FreeBlocks, PoolSizes
from kvservice.core.errors import DataLoss, InvalidArgument, NotFound
from kvservice.core.ids import DEFAULT_TENANT, BlockHash, BlockId, SeqId, TenantId, Tier, WorkerId
from kvservice.core.layout import Layout
from kvservice.core.pins import PinTable
from kvservice.core.planner import WorkerState, cpu_blocks_of, plan_victims, swap_in, swap_out
from kvservice.core.policies import EVICTION_POLICIES, PLACEMENT_POLICIES
from kvservice.core.prefix_cache import tenant_salt
from kvservice.core.sequence import SeqState

_MAX_TOKEN = 2**63 - 1
Write = tuple[SeqState, int, int]  # (sequence, first block, end block) about to be written


class ManagerBase:
    def __init__(
        self,
        layout: Layout,
        workers: Mapping[int, PoolSizes],
        *,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        vocab_size: int | None = None,
        placement: str = "prefix_affinity",
        eviction: str = "lru",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(layout, Layout):
            raise InvalidArgument(f"layout must be a Layout, got {type(layout).__name__}")
        if not 0.0 < low_watermark <= high_watermark <= 1.0:
            raise InvalidArgument(
                f"need 0 < low_watermark <= high_watermark <= 1, got {low_watermark}, {high_watermark}"
            )
        if vocab_size is not None and (not _is_int(vocab_size) or vocab_size <= 0):
            raise InvalidArgument(f"vocab_size must be a positive int, got {vocab_size!r}")
        if placement not in PLACEMENT_POLICIES:
            raise InvalidArgument(f"placement must be one of {sorted(PLACEMENT_POLICIES)}")
        if eviction not in EVICTION_POLICIES:
            raise InvalidArgument(f"eviction must be one of {sorted(EVICTION_POLICIES)}")
        self.layout = layout
        self.block_size = layout.block_size
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.vocab_size = vocab_size
        self._placement = PLACEMENT_POLICIES[placement]()
        self._eviction_name = eviction
        self._clock = clock
        self._workers: dict[int, WorkerState] = {}
        self._seqs: dict[int, SeqState] = {}
        self._lost: set[int] = set()
        self._next_seq_id = 0
        self._pins = PinTable()
        self._salts: dict[TenantId, BlockHash] = {}
        self._upserts: set[int] = set()
        self._deletes: dict[int, int] = {}
        # Computed counts advanced since the last ledger update, of records not otherwise
        # changed: they reach the workers as a compact progress update, not whole records.
        self._progress: set[int] = set()
        # Bumped when a block that several records hold enters the prefix cache: records
        # sent before may lack its hash, so each is sent whole once more (ledger.py).
        self._ledger_epoch = 0
        for worker_id, sizes in workers.items():
            self._add_worker(worker_id, sizes)

    # -- lookups and validation ---------------------------------------------------------

    def _add_worker(self, worker_id: int, sizes: PoolSizes) -> WorkerState:
        if not _is_int(worker_id) or worker_id < 0:
            raise InvalidArgument(f"worker_id must be a non-negative int, got {worker_id!r}")
        if worker_id in self._workers:
            raise InvalidArgument(f"worker {worker_id} already exists")
        gpu, cpu = getattr(sizes, "num_gpu_blocks", None), getattr(sizes, "num_cpu_blocks", None)
        if not isinstance(gpu, int) or not isinstance(cpu, int) or gpu <= 0 or cpu < 0:
            raise InvalidArgument(f"bad pool sizes for worker {worker_id}: {sizes!r}")
        index: dict[BlockHash, BlockMeta] = {}
        wid = WorkerId(worker_id)
        ws = WorkerState(
            wid,
            BlockPool(wid, Tier.GPU, gpu, index),
            BlockPool(wid, Tier.CPU, cpu, index),
            index,
            EVICTION_POLICIES[self._eviction_name](),
            dirty=self._upserts,
        )
        self._workers[worker_id] = ws
        return ws

    def _worker(self, worker_id: int) -> WorkerState:
        ws = self._workers.get(worker_id)
        if ws is None:
            raise NotFound(f"unknown worker {worker_id!r}")
        return ws

    def _seq(self, seq_id: int) -> SeqState:
        seq = self._seqs.get(seq_id)
        if seq is not None:
            return seq
        if seq_id in self._lost:
            raise DataLoss(f"sequence {seq_id} was lost with its worker", [seq_id])
        raise NotFound(f"unknown sequence {seq_id!r}")

    def _seqs_on_one_worker(self, seq_ids: Sequence[int]) -> tuple[WorkerState, list[SeqState]]:
        if isinstance(seq_ids, (str, bytes)) or not len(seq_ids):
            raise InvalidArgument("seq_ids must be a non-empty sequence of ids")
        get = self._seqs.get
        seqs = [get(s) or self._seq(s) for s in seq_ids]
        worker_ids = {s.worker_id for s in seqs}
        if len(worker_ids) > 1:
            raise InvalidArgument(f"sequences span workers {sorted(worker_ids)}; plan per worker")
        return self._workers[seqs[0].worker_id], seqs

    def _tenant(self, tenant: str | None) -> TenantId:
        if tenant is None:
            return DEFAULT_TENANT
        if not isinstance(tenant, str) or not tenant:
            raise InvalidArgument(f"tenant must be a non-empty str, got {tenant!r}")
        return TenantId(tenant)

    def _salt(self, tenant: TenantId) -> BlockHash:
        salt = self._salts.get(tenant)
        if salt is None:
            salt = self._salts[tenant] = tenant_salt(tenant, self.layout.key())
        return salt

    def _tokens(self, tokens: Sequence[int]) -> tuple[list[int], bytes]:
        """Validated token ids and their int64 bytes (the prefix-hash input)."""
        arr = self._token_array(tokens)
        return arr.tolist(), arr.tobytes()

    def _token_array(self, tokens: Sequence[int]) -> array[int]:
        if isinstance(tokens, (str, bytes)):
            raise InvalidArgument("tokens must be a sequence of ints")
        try:
            # Unsigned: the conversion itself refuses negative ids, with no Python-level scan.
            arr = array("Q", tokens)
        except (TypeError, OverflowError) as exc:
            raise InvalidArgument(f"token ids must be ints in [0, 2**64): {exc}") from None
        if arr and self.vocab_size is not None and max(arr) >= self.vocab_size:
            raise InvalidArgument(f"token id {max(arr)} outside the vocabulary ({self.vocab_size})")
        return arr

    def _new_seq_id(self) -> SeqId:
        seq_id = SeqId(self._next_seq_id)
        self._next_seq_id += 1
        return seq_id

    # -- shared steps -------------------------------------------------------------------

    def _expire_pins(self) -> list[Command]:
        commands: list[Command] = []
        for seq_id in self._pins.due(self._clock()):
            commands += self._drop_pin(seq_id)
        return commands

    def _drop_pin(self, seq_id: int) -> list[Command]:
        pin = self._pins.pop(seq_id)
        if pin is None:
            return []
        if seq_id not in self._seqs:
            self._deletes[seq_id] = pin.worker_id
        self._upserts.add(seq_id)
        return self._release(self._workers[pin.worker_id], pin.blocks)

    def _release(self, ws: WorkerState, metas: Iterable[BlockMeta]) -> list[Command]:
        """Drop one reference each; FreeBlocks for blocks that are now free, per tier."""
        freed: dict[Tier, list[BlockId]] = {}
        for meta in metas:
            if ws.pool(meta.tier).decref(meta):
                freed.setdefault(meta.tier, []).append(meta.block_id)
        return [FreeBlocks(ws.worker_id, t, tuple(ids)) for t, ids in sorted(freed.items())]

    def _make_writable(
        self, ws: WorkerState, seqs: list[SeqState], writes: list[Write], num_new: int
    ) -> list[Command] | None:
        """Plan and commit (below); None if out of memory. Skips both when the write
        ranges are already private, uncached and on the GPU, as on most decode steps."""
        if num_new <= ws.gpu.num_queued and not any(s.num_cpu_blocks for s in seqs):
            if len(writes) == 1 and writes[0][2] - writes[0][1] <= 1:  # one block or none
                seq, lo, hi = writes[0]
                meta = seq.blocks[lo] if hi > lo else None
                if meta is None or (meta.ref_cnt == 1 and meta.block_hash is None):
                    del seq.hashes[lo:]
                    return []
            elif all(
                m.ref_cnt == 1 and m.block_hash is None for s, lo, hi in writes for m in s.blocks[lo:hi]
            ):
                for seq, lo, _ in writes:
                    del seq.hashes[lo:]
                return []
        victims = self._plan_room(ws, seqs, writes, num_new)
        if victims is None:
            return None
        return self._commit_room(ws, seqs, writes, victims)

    def _plan_room(
        self, ws: WorkerState, seqs: list[SeqState], writes: list[Write], num_new: int
    ) -> list[SeqState] | None:
        """Victims to swap out so the sequences can be swapped in, copied on write and
        grow by num_new blocks; None if that is impossible. Reads state only."""
        cpu_refs = cpu_blocks_of(seqs)
        need = len(cpu_refs) + num_new
        refs_after_swap_in: dict[BlockMeta, int] = {}
        for seq, lo, hi in writes:
            for meta in seq.blocks[lo:hi]:
                refs = refs_after_swap_in.get(meta)
                if refs is None:
                    refs = cpu_refs[meta] if meta.tier is Tier.CPU else meta.ref_cnt
                if refs > 1:
                    need += 1  # this writer gets its own copy; the others keep the block
                    refs -= 1
                refs_after_swap_in[meta] = refs
        protected = {s.seq_id for s in seqs}
        return plan_victims(ws, need, protected, self._pins)

    def _commit_room(
        self, ws: WorkerState, seqs: list[SeqState], writes: list[Write], victims: list[SeqState]
    ) -> list[Command]:
        """Swap victims out, make the sequences GPU-resident, copy shared blocks in the
        write ranges and take written blocks out of the prefix cache."""
        commands = swap_out(ws, victims) if victims else []
        self._upserts.update(s.seq_id for s in seqs)  # their blocks may change below
        if any(s.num_cpu_blocks for s in seqs):
            commands += swap_in(ws, seqs)
        pairs: list[tuple[BlockId, BlockId]] = []
        gpu = ws.gpu
        for seq, lo, hi in writes:
            del seq.hashes[lo:]
            for i in range(lo, min(hi, len(seq.blocks))):
                meta = seq.blocks[i]
                if meta.ref_cnt > 1:
                    copy = gpu.allocate()
                    assert copy is not None, "planned room is missing"
                    gpu.decref(meta)
                    seq.set_block(i, copy)
                    pairs.append((meta.block_id, copy.block_id))
                elif meta.block_hash is not None:
                    gpu.uncache(meta)  # its contents are about to change
                    seq.block_changed(i)
        if pairs:
            commands.append(CopyBlocks(ws.worker_id, tuple(pairs)))
        return commands


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value: object, low: int, high: float = math.inf) -> int:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise InvalidArgument(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value  # type: ignore[return-value]
