"""KVCacheManager: the one boundary between the coordinator and the paged-memory core.

Pure Python bookkeeping; it never touches tensors. Every mutation returns the commands
(copy, swap, free; see ``kvservice.core.commands``) the workers must run, in list order.
It needs no memory pools at all, so simulations and benchmarks use it unchanged.

Errors: unknown sequence or worker -> ``NotFound``; bad arguments (negative or
overflowing lengths, token ids outside the vocabulary, truncating past the end, forking
a freed sequence) -> ``InvalidArgument``; a sequence whose worker was removed ->
``DataLoss``. Out of memory after evicting cached blocks and swapping is not an error:
the call returns ``OutOfMemory(reason, worker_id)``. Any call that raises or returns
``OutOfMemory`` leaves the state exactly as it was.

API (ids are plain ints at the boundary; tenant is a str, None = "default")::

    KVCacheManager(layout, workers: Mapping[int, PoolSizes], *,
                   high_watermark=0.95, low_watermark=0.85, vocab_size=None,
                   placement="prefix_affinity", eviction="lru", clock=time.time)
    create(tenant, tokens, *, worker_id=None) -> CreateResult(seq_id, worker_id,
        num_cached_tokens, commands) | OutOfMemory
        num_cached_tokens is a multiple of block_size and < len(tokens) (>= 1 token).
    append(seq_id, tokens) -> StepResult(commands) | OutOfMemory
        swaps the sequence in if any block is on CPU; copies a shared last block (COW).
    append_many(seq_ids, tokens: Sequence[Sequence[int]]) -> (commands, num_done,
        OutOfMemory | None)        (append to each in order; stops at the first OOM)
    prepare_decode(seq_ids, tokens: Sequence[int]) -> DecodePlan(worker_id, block_tables,
        seq_lens, slots, commands) | OutOfMemory
        one token per sequence, all on one worker: append + prepare_write + prepare_attention.
    fork(seq_id, n) -> list[SeqId]                      (children share every block)
    truncate(seq_id, length) -> list[Command]
    free(seq_id) -> list[Command]
    prepare_write(seq_id, start, end) -> WritePlan(worker_id, slots, commands) | OutOfMemory
        GPU slots for positions [start, end); swaps in and copies shared blocks first.
    prepare_attention(seq_ids) -> AttentionPlan(worker_id, block_tables, seq_lens,
        commands) | OutOfMemory           (all on one worker; makes them GPU-resident)
    mark_computed(seq_id, num_tokens) -> None
        K/V of positions < num_tokens is written for every layer; full blocks below it
        enter the prefix cache.
    lookup_prefix(tenant, tokens) -> dict[int, int]   (worker -> tokens create would report; > 0)
    offload(seq_ids) -> list[Command]      (best effort swap to CPU; pinned ones stay)
    prefetch(seq_ids) -> list[Command]     (best effort swap to GPU)
    evict_cached(worker_id, num_blocks=None, tier=Tier.GPU) -> int  (drop cached, LRU first)
    pin(seq_id, *, hard=True, ttl_s=None) -> list[Command]   (hard: no ttl; soft: ttl_s > 0)
        holds the sequence's current blocks (even past free) and keeps it from swapping.
    unpin(seq_id) -> list[Command]
    expire_pins() -> list[Command]        (end soft pins whose ttl has passed; housekeeping)
    sequence(seq_id) -> SeqView(seq_id, tenant, worker_id, num_tokens, tokens, block_ids,
        tiers, num_computed_tokens, pinned)
    length(seq_id) -> int                          (token count; no copies, for hot paths)
    add_worker(worker_id, sizes: PoolSizes) -> None
    remove_worker(worker_id) -> list[int]          (the sequences lost; later use -> DataLoss)
    usage() -> dict[int, dict[Tier, TierUsage(total, used, cached, free)]]
    record(seq_id) -> SeqRecord                    (what the worker should keep for it)
    take_ledger_updates() -> dict[int, tuple[dict[int, SeqRecord], list[int]]]
        (upserts, deletes) per worker for everything changed since the last call.
    take_ledger_changes() -> dict[int, LedgerChanges(upserts, deletes, delta())]
        the same, but records the worker holds change by a RecordDelta (ledger.py).
    take_progress_updates() -> dict[int, dict[int, int]]
        {seq_id: num_computed_tokens} per worker for sequences whose computed count grew
        and whose record was not otherwise re-sent (take it after take_ledger_updates).
    KVCacheManager.from_ledgers(layout, workers, records: Mapping[int, Mapping[int,
        SeqRecord]], **options) -> KVCacheManager
        rebuilds tables, pins and the prefix index; new ids continue above old ones.
    check_invariants() -> None                     (AssertionError on any broken invariant)
    num_sequences, workers (properties)

Tier policy: a worker's GPU tier is "occupied" by used plus cached blocks. After a create
pushes occupancy past ``high_watermark``, cached blocks are evicted (LRU) down to
``low_watermark``; if used blocks alone are still above the high mark, the least recently
used unpinned sequences are swapped to that worker's CPU tier (SwapOut). Any call that
needs more GPU blocks than are free or cached swaps LRU sequences out the same way, and
returns OutOfMemory if even that cannot make room. A block moves between tiers only when
every reference to it comes from the sequences being moved; swapping in copies a CPU
block that others still hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvservice.core.commands import (
    Command,
    CreateResult,
    OutOfMemory,
    PoolSizes,
    StepResult,
)
from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import SeqId, Tier
from kvservice.core.layout import Layout
from kvservice.core.ledger import rebuild
from kvservice.core.manager_base import Write, check_count
from kvservice.core.manager_steps import ManagerSteps
from kvservice.core.planner import plan_victims, relieve, swap_out
from kvservice.core.policies import WorkerCandidate
from kvservice.core.prefix_cache import HashChain, match_prefix
from kvservice.core.records import SeqRecord
from kvservice.core.sequence import SeqState

_MAX_FORK = 1 << 16


class KVCacheManager(ManagerSteps):
    """Page tables, block pools, prefix cache and tier policy of every worker."""

    def create(
        self, tenant: str | None, tokens: Sequence[int], *, worker_id: int | None = None
    ) -> CreateResult | OutOfMemory:
        tenant_id = self._tenant(tenant)
        token_list, data = self._tokens(tokens)
        if not token_list:
            raise InvalidArgument("a sequence needs at least one token")
        if worker_id is not None:
            order = [self._worker(worker_id)]
        elif not self._workers:
            return OutOfMemory("no workers")
        else:
            order = list(self._workers.values())
        self._expire_pins()
        chain = HashChain(data, self._salt(tenant_id), self.block_size)
        max_shared = (len(token_list) - 1) // self.block_size  # at least one token computed
        hits = {ws.worker_id: match_prefix(ws.index, chain, tenant_id, max_shared) for ws in order}
        if len(order) > 1:
            candidates = [
                WorkerCandidate(
                    ws.worker_id,
                    len(hits[ws.worker_id]) * self.block_size,
                    ws.gpu.num_queued,
                    ws.gpu.num_blocks,
                )  # fmt: skip
                for ws in order
            ]
            first = self._placement.choose(candidates)
            # Fall back to the roomiest others if the chosen worker is full.
            order.sort(key=lambda ws: (ws.worker_id != first, -ws.gpu.num_queued, ws.worker_id))
        num_blocks = self.layout.num_blocks_for(len(token_list))
        for ws in order:
            shared = hits[ws.worker_id]
            cpu_reserved = sum(1 for m in shared if m.tier is Tier.CPU and m.ref_cnt == 0)
            victims = plan_victims(
                ws,
                num_blocks - len(shared),
                (),
                self._pins,
                held=set(shared),
                cpu_reserved=cpu_reserved,
            )
            if victims is not None:
                break
        else:
            return OutOfMemory(f"no room for {num_blocks} blocks", order[0].worker_id)
        seq = SeqState(self._new_seq_id(), tenant_id, ws.worker_id, token_list)
        for meta in shared:
            ws.pool(meta.tier).incref(meta)
            seq.add_block(meta)
        commands = swap_out(ws, victims)
        for _ in range(num_blocks - len(shared)):
            fresh = ws.gpu.allocate()
            assert fresh is not None, "planned room is missing"
            seq.add_block(fresh)
        seq.num_computed = len(shared) * self.block_size
        seq.hashes = chain.hashes[: len(shared)]
        self._seqs[seq.seq_id] = ws.seqs[seq.seq_id] = seq
        ws.eviction.touch(seq.seq_id)
        self._upserts.add(seq.seq_id)
        commands += relieve(ws, {seq.seq_id}, self._pins, self.high_watermark, self.low_watermark)
        return CreateResult(seq.seq_id, ws.worker_id, seq.num_computed, commands)

    def append(self, seq_id: int, tokens: Sequence[int]) -> StepResult | OutOfMemory:
        seq = self._seq(seq_id)
        token_list = self._token_array(tokens).tolist()
        if not token_list:
            return StepResult([])
        self._expire_pins()
        commands = self._append(seq, token_list)
        if commands is None:
            return OutOfMemory(f"no room to grow sequence {seq_id}", seq.worker_id)
        return StepResult(commands)

    def append_many(
        self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]
    ) -> tuple[list[Command], int, OutOfMemory | None]:
        """``append`` of ``tokens[i]`` to ``seq_ids[i]`` for each i in order, as one call
        (a decode step's tokens). Every id and token is checked before anything changes.
        Returns the commands, how many appends were done, and None or, when the next one
        ran out of memory, its OutOfMemory (it and those after it are unchanged; the
        caller may ``truncate`` the done ones back)."""
        if len(seq_ids) != len(tokens):
            raise InvalidArgument(f"{len(seq_ids)} sequences but {len(tokens)} token lists")
        get = self._seqs.get
        seqs = [get(s) or self._seq(s) for s in seq_ids]
        # Every id checked at once, as plain ints.
        flat = self._token_array([t for new in tokens for t in new]).tolist()
        self._expire_pins()
        commands: list[Command] = []
        end = 0
        bs, workers, upserts = self.block_size, self._workers, self._upserts
        for i, (seq, new) in enumerate(zip(seqs, tokens, strict=True)):
            if not new:
                continue
            start, end = end, end + len(new)
            old_len = len(seq.tokens)
            if end - start == 1 and old_len % bs and not seq.num_cpu_blocks:
                # A decode step's usual token: it lands in the last block, which is on the
                # GPU, private and not cached (a partial block has no hash), so nothing is
                # allocated, copied or uncached (what ``_append`` finds too, at several
                # times the cost).
                last = seq.blocks[-1]
                if last.ref_cnt == 1 and last.block_hash is None:
                    seq.tokens.append(flat[start])
                    workers[seq.worker_id].eviction.touch(seq.seq_id)
                    upserts.add(seq.seq_id)
                    continue
            step = self._append(seq, flat[start:end])
            if step is None:
                return (
                    commands,
                    i,
                    OutOfMemory(f"no room to grow sequence {seq.seq_id}", seq.worker_id),
                )
            commands += step
        return commands, len(seqs), None

    def _append(self, seq: SeqState, token_list: list[int]) -> list[Command] | None:
        ws = self._workers[seq.worker_id]
        old_len = len(seq.tokens)
        num_new = -(-(old_len + len(token_list)) // self.block_size) - len(seq.blocks)
        write: Write = (seq, old_len // self.block_size, len(seq.blocks))
        commands = self._make_writable(ws, [seq], [write], num_new)
        if commands is None:
            return None
        for _ in range(num_new):
            meta = ws.gpu.allocate()
            assert meta is not None, "planned room is missing"
            seq.add_block(meta)
        seq.tokens += token_list
        ws.eviction.touch(seq.seq_id)
        self._upserts.add(seq.seq_id)
        return commands

    def fork(self, seq_id: int, n: int) -> list[SeqId]:
        seq = self._seqs.get(seq_id)
        if seq is None and seq_id not in self._lost and 0 <= seq_id < self._next_seq_id:
            raise InvalidArgument(f"sequence {seq_id} was freed and cannot be forked")
        seq = self._seq(seq_id)
        check_count("n", n, 1, _MAX_FORK)
        ws = self._workers[seq.worker_id]
        for meta in seq.blocks:
            ws.pool(meta.tier).incref(meta, n)
        children = []
        for _ in range(n):
            child = SeqState(
                self._new_seq_id(),
                seq.tenant,
                seq.worker_id,
                seq.tokens.copy(),
                seq.blocks.copy(),
                seq.block_ids.copy(),
                seq.num_cpu_blocks,
                seq.num_computed,
                seq.hashes.copy(),
            )
            self._seqs[child.seq_id] = ws.seqs[child.seq_id] = child
            ws.eviction.touch(child.seq_id)
            self._upserts.add(child.seq_id)
            children.append(child.seq_id)
        return children

    def truncate(self, seq_id: int, length: int) -> list[Command]:
        seq = self._seq(seq_id)
        check_count("length", length, 0, len(seq.tokens))
        ws = self._workers[seq.worker_id]
        dropped = seq.cut_blocks(self.layout.num_blocks_for(length))
        commands = self._release(ws, reversed(dropped))
        seq.cut_tokens(length)
        seq.num_computed = min(seq.num_computed, length)
        del seq.hashes[length // self.block_size :]
        if length % self.block_size:
            last = seq.blocks[-1]
            if last.ref_cnt == 1 and last.block_hash is not None:
                ws.pool(last.tier).uncache(last)  # the next append overwrites its tail
                seq.block_changed(len(seq.blocks) - 1)
        self._upserts.add(seq_id)
        return commands

    def free(self, seq_id: int) -> list[Command]:
        if seq_id in self._lost:
            self._lost.discard(seq_id)
            return []
        seq = self._seq(seq_id)
        ws = self._workers[seq.worker_id]
        # Tail first: a cached child is useless once its parent is evicted.
        commands = self._release(ws, reversed(seq.cut_blocks(0)))
        del self._seqs[seq_id], ws.seqs[seq_id]
        ws.eviction.remove(seq_id)
        if seq_id in self._pins:
            self._upserts.add(seq_id)  # the record lives on for its pin
        else:
            self._upserts.discard(seq_id)
            self._deletes[seq_id] = ws.worker_id
        return commands

    def lookup_prefix(self, tenant: str | None, tokens: Sequence[int]) -> dict[int, int]:
        """Tokens of this prompt each worker could serve from cache (as create would)."""
        tenant_id = self._tenant(tenant)
        arr = self._token_array(tokens)
        chain = HashChain(arr.tobytes(), self._salt(tenant_id), self.block_size)
        max_shared = max(len(arr) - 1, 0) // self.block_size
        out: dict[int, int] = {}
        for worker_id, ws in self._workers.items():
            hits = match_prefix(ws.index, chain, tenant_id, max_shared)
            if hits:
                out[worker_id] = len(hits) * self.block_size
        return out

    @classmethod
    def from_ledgers(
        cls,
        layout: Layout,
        workers: Mapping[int, PoolSizes],
        records: Mapping[int, Mapping[int, SeqRecord]],
        **options: Any,
    ) -> KVCacheManager:
        """Rebuild page tables, refcounts, pins and the prefix index from worker ledgers."""
        return rebuild(layout, workers, records, options)
