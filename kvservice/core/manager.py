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

API (ids are ints: SeqId, WorkerId, BlockId; tenant is a str, None = "default")::

    KVCacheManager(layout, workers: Mapping[WorkerId, PoolSizes], *,
                   high_watermark=0.95, low_watermark=0.85, vocab_size=None,
                   placement="prefix_affinity", eviction="lru", clock=time.time)
    create(tenant, tokens, *, worker_id=None) -> CreateResult(seq_id, worker_id,
        num_cached_tokens, commands) | OutOfMemory
        num_cached_tokens is a multiple of block_size and < len(tokens) (>= 1 token).
    append(seq_id, tokens) -> StepResult(commands) | OutOfMemory
        swaps the sequence in if any block is on CPU; copies a shared last block (COW).
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
    lookup_prefix(tenant, tokens) -> dict[WorkerId, int]   (cached tokens per worker, > 0 only)
    offload(seq_ids) -> list[Command]      (best effort swap to CPU; pinned ones stay)
    prefetch(seq_ids) -> list[Command]     (best effort swap to GPU)
    evict_cached(worker_id, num_blocks=None) -> int   (drop cached blocks, LRU first)
    pin(seq_id, *, hard=True, ttl_s=None) -> None     (hard: no ttl; soft: ttl_s > 0)
    unpin(seq_id) -> list[Command]
    sequence(seq_id) -> SeqView(seq_id, tenant, worker_id, num_tokens, tokens, block_ids,
        tiers, num_computed_tokens, pinned)
    add_worker(worker_id, sizes: PoolSizes) -> None
    remove_worker(worker_id) -> list[SeqId]        (the sequences lost; later use -> DataLoss)
    usage() -> dict[WorkerId, dict[Tier, TierUsage(total, used, cached, free)]]
    record(seq_id) -> SeqRecord                    (what the worker should keep for it)
    take_ledger_updates() -> dict[WorkerId, tuple[dict[SeqId, SeqRecord], list[SeqId]]]
        (upserts, deletes) per worker for everything changed since the last call.
    KVCacheManager.from_ledgers(layout, workers, records: Mapping[WorkerId,
        Mapping[SeqId, SeqRecord]], **options) -> KVCacheManager
    check_invariants() -> None                     (AssertionError on any broken invariant)
    num_sequences, workers (properties)

Tier policy: a worker's GPU tier is "occupied" by used plus cached blocks. After a create
pushes occupancy past ``high_watermark``, cached blocks are evicted (LRU) down to
``low_watermark``; if used blocks alone are still above the high mark, the least recently
used unpinned sequences are swapped to that worker's CPU tier (SwapOut). Any call that
needs more GPU blocks than are free or cached swaps LRU sequences out the same way, and
returns OutOfMemory if even that cannot make room.
"""
