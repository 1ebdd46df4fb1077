"""The coordinator: the service API over the core manager and the workers.

A plain class (no Ray, no gRPC); the transports wrap it. Each call is planned by the
core ``KVCacheManager`` into worker commands (copy on write, swap out, swap in), the
commands go to the workers, and the data-plane work (write K/V, attention) goes to the
worker that holds each sequence, with the block tables the plan produced. The data plane
(``write_kv``, ``attend``) lives in ``kvservice.data_plane`` (a part of this class);
argument checks in ``kvservice.arg_checks``; steps the client runs on the workers itself
in ``kvservice.tickets`` and ``kvservice.decode_steps``.

Invariants:
- Planning is serialized under one lock, and everything a plan implies (commands, the
  data-plane call, ledger updates) is *submitted* to the workers before the lock is
  released; results are awaited after it. Calls to one worker run in submission order
  (``coordinator_workers``), so a later plan that swaps a sequence out or reuses its
  freed blocks can never overtake a call still reading them. No pins are needed, and
  calls on different workers, or queued behind each other on one, overlap with the
  planning of the next.
- Every command the manager returns is submitted, even when a later step of the same
  call fails: the workers' pools always follow the tables.
- A failed call leaves the visible state unchanged: arguments are checked before any
  table is touched; a batched append that runs out of memory is rolled back; a
  data-plane call that fails records nothing as written.
- Tenants: a tenant names only its own sequences; any other id is NOT_FOUND, with the
  same message whether or not it exists.
- The prefix cache learns a full block once its K/V is written for every layer: the
  coordinator tracks, per sequence and layer, how many leading positions are written
  and calls ``mark_computed`` with the minimum over layers when it grows. Writes that
  would leave a hole, and attention over positions without K/V, are FAILED_PRECONDITION.
- Each worker's ledger gets the manager's record changes after every call that allocates,
  frees or moves blocks, so a restarted coordinator can ``recover`` from the ledgers: a
  record the worker holds changes by a ``RecordDelta`` (new tokens, changed blocks,
  counts), so an append to many sequences sends only what each one gained.
  A computed count that grows (a step's last layer written) reaches the ledgers at once
  as a compact ``update_progress`` ({seq_id: count}); whole records go out only when a
  record changes otherwise (tokens, blocks, pins, prefix hashes).
- A worker found dead: the manager drops it, its sequences answer DATA_LOSS (naming
  them) until freed, and every other sequence carries on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from kvservice.api import SequenceInfo
from kvservice.arg_checks import INT64_MAX, as_int, check_id, check_ids, check_int, check_tenant
from kvservice.coordinator_workers import PendingCall, WorkerHandle, WorkerLost, resolve_all
from kvservice.core import errors
from kvservice.core.commands import (
    CopyBlocks,
    FreeBlocks,
    OutOfMemory,
    PoolSizes,
    SwapIn,
    SwapOut,
)
from kvservice.core.ids import DEFAULT_TENANT, Tier
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager
from kvservice.data_plane import DataPlane
from kvservice.metrics import Metrics
from kvservice.migration import Migrator
from kvservice.quotas import QuotaManager
from kvservice.spanning import (
    SpanTable,
    default_segment_tokens,
    is_segment_tenant,
    split_span_records,
)
from kvservice.step_plan import StepPlans, exact_ints
from kvservice.tickets import DEFAULT_TTL_S, Ticket, TicketTable

log = logging.getLogger(__name__)

# A single fork may not create more children than this (a typo must not fill memory).
MAX_FORK = 4096
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Prefix affinity within a load slack: a popular prefix cannot pile every sequence onto
# one worker (the migrator copies it to the chosen one instead).
PLACEMENT = "affinity_load"
_TIER_NAMES = {int(Tier.GPU): "gpu", int(Tier.CPU): "cpu"}


@dataclass(slots=True)
class _SeqState:
    """The coordinator's own view of a sequence, beside the manager's tables."""

    tenant: str
    worker_id: int
    length: int
    # written[layer] = leading positions whose K/V is written in that layer.
    written: list[int]
    # min(written), as last passed to mark_computed.
    computed: int
    # False after recovery: the per-layer progress of the last step was not recorded,
    # so the "no holes, no reads of unwritten K/V" checks are skipped for it.
    tracked: bool = True
    # Bumped by every change of the sequence's tokens or sharing (append, fork,
    # truncate): a data-plane call planned before a truncate records no writes, and a
    # write range made writable (copied on write) under one version stays so.
    version: int = 0
    # (version, start, end, computed) of the last range prepare_write made writable.
    writable: tuple[int, int, int, int] | None = None
    lost: bool = False


@dataclass(slots=True)
class _Batch:
    """Worker calls submitted while planning one service call, and their results."""

    calls: list[PendingCall] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)


class Coordinator(DataPlane):
    """The service API (``kvservice.api.Service``) over a KVCacheManager and worker handles.

    ``workers``: handles by worker id (``LocalWorkerHandle`` or ``RayWorkerHandle``).
    ``manager``: a prebuilt manager (``recover`` passes one rebuilt from ledgers).
    ``segment_tokens``: sequences longer than this are held as segments that page
    between tiers and spread over workers (``kvservice.spanning``); default: an eighth
    of the smallest GPU tier, at least 16 blocks.
    ``quotas`` (tenant -> blocks) and ``default_quota`` (tenants not listed): the most
    blocks a tenant may hold; past it RESOURCE_EXHAUSTED (``kvservice.quotas``).
    """

    def __init__(
        self,
        layout: Layout,
        workers: Mapping[int, WorkerHandle] | Iterable[WorkerHandle],
        *,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        vocab_size: int | None = None,
        metrics: Metrics | None = None,
        manager: KVCacheManager | None = None,
        segment_tokens: int | None = None,
        quotas: Mapping[str, int] | None = None,
        default_quota: int | None = None,
    ) -> None:
        handles = _handles_by_id(workers)
        if not handles:
            raise errors.InvalidArgument("a coordinator needs at least one worker")
        self._layout = layout
        self._dtype = _TORCH_DTYPES[layout.dtype]
        self._vocab_size = vocab_size
        self._handles = handles
        self._infos = dict(
            zip(handles, resolve_all([h.submit("info") for h in handles.values()]), strict=True)
        )
        for wid, info in self._infos.items():
            if info.layout != layout:
                raise errors.InvalidArgument(
                    f"worker {wid} has layout {info.layout.key()}, expected {layout.key()}"
                )
        if manager is None:
            manager = KVCacheManager(
                layout,
                {
                    wid: PoolSizes(i.num_gpu_blocks, i.num_cpu_blocks)
                    for wid, i in self._infos.items()
                },
                high_watermark=high_watermark,
                low_watermark=low_watermark,
                vocab_size=vocab_size,
                placement=PLACEMENT,
            )
        if quotas or default_quota is not None:
            manager = QuotaManager(manager, quotas or {}, default=default_quota)  # type: ignore[assignment]
        self._manager = manager
        if segment_tokens is None:
            gpu_blocks = [i.num_gpu_blocks for i in self._infos.values()]
            segment_tokens = default_segment_tokens(gpu_blocks, layout.block_size)
        self._spans = SpanTable(manager, segment_tokens)
        # Placement with prefix copies, migration, drains, rebalancing, workers joining.
        self.migrator = Migrator(self)
        self._lock = threading.RLock()
        self._steps = StepPlans(layout.num_layers)
        # Steps the clients run on the workers themselves (kvservice.tickets).
        self._tickets = TicketTable()
        self._seqs: dict[int, _SeqState] = {}
        self._pin_tenants: dict[int, str] = {}  # pinned sequences (live or freed) -> tenant
        self._closed = False
        self._close_hooks: list[Callable[[], None]] = []
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.bind(self._snapshot)

    @classmethod
    def recover(
        cls,
        layout: Layout,
        workers: Mapping[int, WorkerHandle] | Iterable[WorkerHandle],
        **kwargs: Any,
    ) -> Coordinator:
        """A coordinator whose tables are rebuilt from the workers' ledgers."""
        handles = _handles_by_id(workers)
        infos = resolve_all([h.submit("info") for h in handles.values()])
        ledgers = resolve_all([h.submit("ledger") for h in handles.values()])
        records, span_records = split_span_records(
            {wid: ledger.records for wid, ledger in zip(handles, ledgers, strict=True)}
        )
        sizes = {
            wid: PoolSizes(i.num_gpu_blocks, i.num_cpu_blocks)
            for wid, i in zip(handles, infos, strict=True)
        }
        options = {
            k: kwargs[k] for k in ("high_watermark", "low_watermark", "vocab_size") if k in kwargs
        }
        manager = KVCacheManager.from_ledgers(
            layout, sizes, records, placement=PLACEMENT, **options
        )
        coordinator = cls(layout, handles, manager=manager, **kwargs)
        for wid, worker_records in records.items():
            for sid, record in worker_records.items():
                if not record.live or is_segment_tenant(record.tenant):
                    continue
                computed = int(record.num_computed_tokens)
                coordinator._seqs[int(sid)] = _SeqState(
                    tenant=record.tenant,
                    worker_id=wid,
                    length=len(record.tokens),
                    written=[computed] * layout.num_layers,
                    computed=computed,
                    tracked=False,
                )
        restored, unrestorable = coordinator._spans.restore(span_records)
        for sid, (length, computed) in restored.items():
            state = coordinator._seqs.get(sid)
            if state is not None:
                state.length, state.computed = length, computed
                state.written = [computed] * layout.num_layers
        for sid in unrestorable:  # a segment's worker is gone: DATA_LOSS, as for a lost one
            if sid in coordinator._seqs:
                coordinator._seqs[sid].lost = True
        log.info("recovered %d sequences from %d ledgers", len(coordinator._seqs), len(records))
        return coordinator

    def add_close_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on ``close`` (stopping the workers a transport started)."""
        self._close_hooks.append(hook)

    def close(self) -> None:
        """Refuse new calls (UNAVAILABLE); calls already planned finish; run the close hooks."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            hooks, self._close_hooks = self._close_hooks, []
        for hook in reversed(hooks):
            hook()

    def layout(self) -> Layout:
        return self._layout

    @property
    def manager(self) -> KVCacheManager:
        return self._manager

    @property
    def worker_ids(self) -> list[int]:
        return sorted(self._handles)

    # ------------------------------------------------------------------ workers joining, leaving

    def add_worker(self, handle: WorkerHandle) -> None:
        """Serve new sequences on one more worker (a new one, or one taken back empty)."""
        self.migrator.add_worker(handle)

    def drain_worker(self, worker_id: int, *, remove: bool = True) -> dict[str, Any]:
        """Move the worker's sequences and pins to the others; with ``remove`` it then
        leaves the tables (``kvservice.migration``). Returns what moved."""
        return self.migrator.drain(worker_id, remove=remove)

    def migrate(self, seq_ids: Sequence[int], worker_id: int) -> dict[str, Any]:
        """Move sequences (all on one worker; a long one's first segment) to ``worker_id``."""
        return self.migrator.migrate(seq_ids, worker_id)

    def rebalance(self, *, threshold: float | None = None) -> dict[str, Any]:
        """Move cold sequences from the busiest worker to the least busy one."""
        return self.migrator.rebalance(threshold=threshold)

    def form_transfer_group(self) -> dict[int, int]:
        """(Re)form the workers' transfer group (blocks move GPU to GPU); the ranks."""
        return self.migrator.form_group()

    # ------------------------------------------------------------------ sequences

    def create_sequence(
        self, tokens: Sequence[int], *, tenant: str = DEFAULT_TENANT
    ) -> SequenceInfo:
        with self.metrics.time_call("create_sequence"):
            tenant = check_tenant(tenant)
            tokens = self._check_tokens("tokens", tokens, allow_empty=False)
            with self._planning() as batch:
                first = tokens[: self._spans.segment_tokens]  # what the prefix cache sees
                self.migrator.before_create(tenant, first, batch.calls)
                result, commands = self._spans.create(tenant, tokens)
                if isinstance(result, OutOfMemory):
                    self._submit(commands, batch.calls)
                    raise errors.ResourceExhausted(f"create_sequence: {result.reason}")
                cached = int(result.num_cached_tokens)
                self._seqs[result.seq_id] = _SeqState(
                    tenant=tenant,
                    worker_id=result.worker_id,
                    length=len(tokens),
                    written=[cached] * self._layout.num_layers,
                    computed=cached,
                )
                self._submit(commands, batch.calls)
                self.metrics.count_created(len(tokens), cached)
                info = self._info(result.seq_id)
            return info

    def append_tokens(
        self,
        seq_ids: Sequence[int],
        tokens: Sequence[Sequence[int]],
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        with self.metrics.time_call("append_tokens"):
            tenant = check_tenant(tenant)
            seq_ids = check_ids(seq_ids, unique=True)
            if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
                raise errors.InvalidArgument("tokens must be a list of token lists")
            if len(tokens) != len(seq_ids):
                raise errors.InvalidArgument(
                    f"{len(seq_ids)} seq_ids but {len(tokens)} token lists"
                )
            token_lists = self._exact_token_lists(tokens)
            if token_lists is None:
                token_lists = [
                    self._check_tokens(f"tokens[{i}]", t, allow_empty=True)
                    for i, t in enumerate(tokens)
                ]
            with self._planning() as batch:
                states = [self._own(sid, tenant) for sid in seq_ids]
                commands: list[Any] = []
                done: list[int] = []
                try:
                    if self._append_whole(seq_ids, states, token_lists, commands):
                        return
                    for sid, state, new in zip(seq_ids, states, token_lists, strict=True):
                        if not new:
                            continue
                        failed, step = self._spans.append(
                            sid, tenant, state.worker_id, state.length, new
                        )
                        commands.extend(step)
                        if failed is not None:
                            # All or nothing: give back what the earlier sequences took.
                            for done_sid in reversed(done):
                                length = self._seqs[done_sid].length
                                commands.extend(self._spans.truncate(done_sid, length))
                            raise errors.ResourceExhausted(
                                f"append_tokens: sequence {sid}: {failed.reason}"
                            )
                        done.append(sid)
                    for state, new in zip(states, token_lists, strict=True):
                        if new:
                            state.length += len(new)
                            state.version += 1
                finally:
                    self._submit(commands, batch.calls)

    def _append_whole(
        self,
        seq_ids: list[int],
        states: list[_SeqState],
        token_lists: list[list[int]],
        commands: list[Any],
    ) -> bool:
        """The usual append: no sequence is or becomes a long one (segments), so the
        manager appends them all in one call. False (nothing done) otherwise. All or
        nothing, as the per-sequence path."""
        manager = self._manager
        if not isinstance(manager, KVCacheManager) or self._spans.any_span(seq_ids):
            return False
        size = self._spans.segment_tokens
        for state, new in zip(states, token_lists, strict=True):
            if 0 <= size - state.length < len(new):
                return False  # it would open a segment
        step, num_done, failed = manager.append_many(seq_ids, token_lists)
        commands += step
        if failed is not None:
            for i in reversed(range(num_done)):  # give back what the earlier ones took
                if token_lists[i]:
                    commands += manager.truncate(seq_ids[i], states[i].length)
            raise errors.ResourceExhausted(
                f"append_tokens: sequence {seq_ids[num_done]}: {failed.reason}"
            )
        for state, new in zip(states, token_lists, strict=True):
            if new:
                state.length += len(new)
                state.version += 1
        return True

    def fork(self, seq_id: int, n: int, *, tenant: str = DEFAULT_TENANT) -> list[int]:
        with self.metrics.time_call("fork"):
            tenant = check_tenant(tenant)
            seq_id = check_id(seq_id)
            n = check_int("n", n, low=1, high=MAX_FORK)
            with self._planning() as batch:
                parent = self._own(seq_id, tenant)
                children = self._spans.fork(seq_id, n)
                parent.version += 1  # its blocks are shared now
                for child in children:
                    self._seqs[child] = _SeqState(
                        tenant=parent.tenant,
                        worker_id=parent.worker_id,
                        length=parent.length,
                        written=list(parent.written),
                        computed=parent.computed,
                        tracked=parent.tracked,
                    )
                self._submit((), batch.calls)
            return children

    def truncate(self, seq_id: int, length: int, *, tenant: str = DEFAULT_TENANT) -> None:
        with self.metrics.time_call("truncate"):
            tenant = check_tenant(tenant)
            seq_id = check_id(seq_id)
            length = check_int("length", length, low=0)
            with self._planning() as batch:
                state = self._own(seq_id, tenant)
                current = state.length
                if length > current:
                    raise errors.FailedPrecondition(
                        f"cannot truncate sequence {seq_id} of {current} tokens to {length}"
                    )
                self._revoke_tickets(self._tickets.naming_seqs([seq_id]), batch.calls)
                commands = self._spans.truncate(seq_id, length)
                state.written = [min(w, length) for w in state.written]
                state.computed = min(state.computed, length)
                state.length = length
                state.version += 1
                self._submit(commands, batch.calls)

    def free(self, seq_ids: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> None:
        with self.metrics.time_call("free"):
            tenant = check_tenant(tenant)
            seq_ids = check_ids(seq_ids, unique=True)
            with self._planning() as batch:
                for sid in seq_ids:
                    self._own(sid, tenant, allow_lost=True)
                self._revoke_tickets(self._tickets.naming_seqs(seq_ids), batch.calls)
                commands: list[Any] = []
                for sid in seq_ids:
                    state = self._seqs.pop(sid)
                    if state.lost:
                        continue  # its worker and blocks are gone already
                    commands.extend(self._spans.free(sid))
                self._submit(commands, batch.calls)

    def get_sequence(self, seq_id: int, *, tenant: str = DEFAULT_TENANT) -> SequenceInfo:
        with self.metrics.time_call("get_sequence"):
            tenant = check_tenant(tenant)
            seq_id = check_id(seq_id)
            with self._lock:
                self._own(seq_id, tenant)
                return self._info(seq_id)

    def lookup_prefix(
        self, tokens: Sequence[int], *, tenant: str = DEFAULT_TENANT
    ) -> dict[int, int]:
        with self.metrics.time_call("lookup_prefix"):
            tenant = check_tenant(tenant)
            tokens = self._check_tokens("tokens", tokens, allow_empty=True)
            with self._lock:
                found = self._manager.lookup_prefix(tenant, tokens)
            return {int(w): int(n) for w, n in found.items() if n > 0}

    def offload(self, seq_ids: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> None:
        with self.metrics.time_call("offload"):
            self._hint("offload", seq_ids, tenant)

    def prefetch(self, seq_ids: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> None:
        with self.metrics.time_call("prefetch"):
            self._hint("prefetch", seq_ids, tenant)

    def pin(
        self,
        seq_id: int,
        *,
        hard: bool = True,
        ttl_s: float | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        """Keep the sequence's blocks where they are (never swapped out or evicted): a hard
        pin until ``unpin`` (it outlives ``free``: a system prompt stays cached), a soft pin
        (``hard=False``) for ``ttl_s`` seconds. A long sequence pins its first segment (its
        attention sinks and system prompt); its other segments keep paging."""
        with self.metrics.time_call("pin"):
            tenant = check_tenant(tenant)
            seq_id = check_id(seq_id)
            with self._planning() as batch:
                self._own(seq_id, tenant)
                self._submit(self._manager.pin(seq_id, hard=hard, ttl_s=ttl_s), batch.calls)
                self._pin_tenants[seq_id] = tenant

    def unpin(self, seq_id: int, *, tenant: str = DEFAULT_TENANT) -> None:
        """End the sequence's pin (also after it was freed); nothing if it has none."""
        with self.metrics.time_call("unpin"):
            tenant = check_tenant(tenant)
            seq_id = check_id(seq_id)
            with self._planning() as batch:
                if seq_id in self._seqs or self._pin_tenants.get(seq_id) != tenant:
                    self._own(seq_id, tenant)
                self._pin_tenants.pop(seq_id, None)
                try:
                    commands = self._manager.unpin(seq_id)
                except errors.NotFound:  # freed, and its soft pin ran out meanwhile
                    commands = []
                self._submit(commands, batch.calls)

    def _hint(self, method: str, seq_ids: Sequence[int], tenant: str) -> None:
        tenant = check_tenant(tenant)
        ids = list(dict.fromkeys(check_ids(seq_ids, unique=False)))
        with self._planning() as batch:
            for sid in ids:
                self._own(sid, tenant)
            self._submit(getattr(self._manager, method)(self._spans.core_ids(ids)), batch.calls)

    # ------------------------------------------------------------------ data plane

    def open_ticket(
        self,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        *,
        writes: bool = True,
        ttl_s: float = DEFAULT_TTL_S,
        tenant: str = DEFAULT_TENANT,
    ) -> Ticket:
        """Plan one step for the client to run on the workers itself (``Ticket.attend``
        per layer, then ``close_ticket``); see ``kvservice.tickets``."""
        from kvservice.tickets import open_ticket

        with self.metrics.time_call("open_ticket"):
            return open_ticket(self, seq_ids, q_lens, writes=writes, tenant=tenant, ttl_s=ttl_s)

    def close_ticket(
        self, ticket_id: int, *, commit: bool = True, tenant: str = DEFAULT_TENANT
    ) -> None:
        """End a ticket; a writing one's writes of every layer are recorded (``commit``)."""
        from kvservice.tickets import close_ticket

        with self.metrics.time_call("close_ticket"):
            close_ticket(
                self, check_int("ticket_id", ticket_id, low=1), commit=commit, tenant=tenant
            )

    def _revoke_tickets(
        self, ticket_ids: list[int], calls: list[PendingCall], *, reason: str = "revoked"
    ) -> None:
        if ticket_ids:
            from kvservice.tickets import revoke

            revoke(self, ticket_ids, calls, reason=reason)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Usage per worker and tier, sequences, prefix cache, swaps, and each worker's stats.

        Keys: layout{num_layers, num_kv_heads, head_dim, dtype, block_size, block_bytes},
        workers{id: {device, tiers{gpu|cpu: {total, used, cached, free}}, worker{...}}},
        sequences_live, sequences_by_tenant{tenant: n}, sequences_created,
        prefix_cache{queries, hits, query_tokens, hit_tokens, hit_rate},
        swaps{out|in: {count, blocks, bytes}}, cow_blocks,
        long_sequences{count, segment_tokens, bytes{hot|cold}, attention_read_bytes{hot|cold},
        stream_seconds}.
        """
        with self.metrics.time_call("stats"):
            with self._lock:
                snap = self._snapshot()
                tenants: dict[str, int] = {}
                for state in self._seqs.values():
                    tenants[state.tenant] = tenants.get(state.tenant, 0) + 1
                totals = dict(self.metrics.totals)
                handles = dict(self._handles)
            worker_stats: dict[int, Any] = {}
            for wid, handle in handles.items():
                try:
                    worker_stats[wid] = handle.call("stats")
                except Exception as exc:  # stats describe a sick worker rather than fail
                    worker_stats[wid] = {"error": str(exc)}
            stream_seconds = 0.0
            for wid, ws in worker_stats.items():
                seconds = ws.get("kernel_time", {}).get("tiered_stream", {}).get("seconds", 0.0)
                self.metrics.observe_stream_seconds(wid, seconds)
                stream_seconds += seconds
            layout = self._layout
            queries = totals["prefix_query_tokens"]
            return {
                "layout": {
                    "num_layers": layout.num_layers,
                    "num_kv_heads": layout.num_kv_heads,
                    "head_dim": layout.head_dim,
                    "dtype": layout.dtype,
                    "block_size": layout.block_size,
                    "block_bytes": layout.block_bytes,
                },
                "workers": {
                    str(wid): {
                        "device": self._infos[wid].device,
                        "tiers": {_TIER_NAMES[t]: counts for t, counts in tiers.items()},
                        "worker": _jsonable(worker_stats.get(wid, {})),
                    }
                    for wid, tiers in snap["usage"].items()
                },
                "sequences_live": snap["sequences_live"],
                "sequences_by_tenant": tenants,
                "sequences_created": totals["sequences_created"],
                "prefix_cache": {
                    "queries": totals["prefix_queries"],
                    "hits": totals["prefix_hits"],
                    "query_tokens": queries,
                    "hit_tokens": totals["prefix_hit_tokens"],
                    "hit_rate": totals["prefix_hit_tokens"] / queries if queries else 0.0,
                },
                "swaps": {
                    d: {
                        "count": totals[f"swaps_{d}"],
                        "blocks": totals[f"swap_blocks_{d}"],
                        "bytes": totals[f"swap_bytes_{d}"],
                    }
                    for d in ("out", "in")
                },
                "cow_blocks": totals["cow_blocks"],
                "long_sequences": {
                    **snap["long_sequences"],
                    "segment_tokens": self._spans.segment_tokens,
                    "attention_read_bytes": {
                        t: totals[f"attention_read_bytes_{t}"] for t in ("hot", "cold")
                    },
                    "stream_seconds": stream_seconds,
                },
                # Sequences moved and prefixes copied between workers, by transfer path
                # (transfers_peer, transfers_group, transfers_host), and the transfer group.
                "migration": _jsonable(self.migrator.stats()),
            }

    def check_invariants(self) -> None:
        """The manager's invariants plus the coordinator's own bookkeeping (AssertionError)."""
        with self._lock:
            self._manager.check_invariants()
            for sid, state in self._seqs.items():
                if state.lost:
                    continue
                view = self._manager.sequence(sid)
                assert view.tenant == state.tenant, (sid, view.tenant, state.tenant)
                assert view.worker_id == state.worker_id, (sid, view.worker_id, state.worker_id)
                assert state.computed <= min(state.written), (sid, state)
                first = self._spans.first_length(sid, state.length)
                assert max(state.written) <= state.length, (sid, state)
                assert first == view.num_tokens, (sid, state, first, view.num_tokens)
            live = {sid: st.length for sid, st in self._seqs.items() if not st.lost}
            self._spans.check_invariants(live)

    # ------------------------------------------------------------------ internals

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            usage = self._manager.usage()
            return {
                "usage": {
                    int(wid): {int(tier): _usage_dict(u) for tier, u in tiers.items()}
                    for wid, tiers in usage.items()
                },
                "sequences_live": sum(1 for s in self._seqs.values() if not s.lost),
                "long_sequences": {
                    "count": self._spans.num_spans(),
                    "bytes": self._spans.bytes_by_tier(),
                },
            }

    def _info(self, seq_id: int) -> SequenceInfo:
        view = self._manager.sequence(seq_id)
        state = self._seqs[seq_id]
        tiers = [int(t) for t in view.tiers]
        if self._spans.is_span(seq_id):
            tiers = self._spans.blocks(seq_id)[1]
        return SequenceInfo(
            seq_id=int(seq_id),
            length=int(state.length),
            num_cached_tokens=int(min(state.computed, state.length)),
            worker_id=int(view.worker_id),
            num_blocks=len(tiers),
            tiers=tuple(tiers),
        )

    def _own(self, seq_id: int, tenant: str, *, allow_lost: bool = False) -> _SeqState:
        state = self._seqs.get(seq_id)
        if state is None or state.tenant != tenant:
            raise errors.NotFound(f"sequence {seq_id} not found")
        if state.lost and not allow_lost:
            raise errors.DataLoss(
                f"sequence {seq_id} was lost with worker {state.worker_id}; free it", [seq_id]
            )
        return state

    def _check_open(self) -> None:
        if self._closed:
            raise errors.Unavailable("the coordinator is shutting down")

    def _submit(
        self, commands: Iterable[Any], calls: list[PendingCall], *, ledger: bool = True
    ) -> None:
        """Submit the manager's commands in order (then, by default, the ledger updates)."""
        block_bytes = self._layout.block_bytes
        for cmd in _coalesce(commands):
            if self._tickets:
                self._revoke_tickets(
                    self._tickets.naming_blocks(cmd.worker_id, _gpu_blocks(cmd)), calls
                )
            if isinstance(cmd, FreeBlocks):
                continue  # informational: a freed block needs nothing from its worker
            self._steps.invalidate()  # blocks move: kept step plans may name old places
            if isinstance(cmd, CopyBlocks):
                method = "copy_blocks"
                self.metrics.count_cow(len(cmd.pairs))
            elif isinstance(cmd, SwapOut):
                method = "swap_out"
                self.metrics.count_swap("out", len(cmd.pairs), block_bytes)
            elif isinstance(cmd, SwapIn):
                method = "swap_in"
                self.metrics.count_swap("in", len(cmd.pairs), block_bytes)
            else:
                raise TypeError(f"unknown command {cmd!r}")
            handle = self._handles.get(cmd.worker_id)
            if handle is not None:
                calls.append(handle.submit(method, list(cmd.pairs)))
        if ledger:
            self._submit_ledger(calls)

    def _submit_ledger(self, calls: list[PendingCall]) -> None:
        for wid, changes in self._manager.take_ledger_changes().items():
            handle = self._handles.get(wid)
            delta = changes.delta()
            if handle is not None and (changes.upserts or changes.deletes or delta):
                args = (changes.upserts, changes.deletes) + ((delta,) if delta else ())
                calls.append(handle.submit("update_ledger", *args))
        for wid, (upserts, deletes) in self._spans.take_ledger_updates().items():
            handle = self._handles.get(wid)
            if handle is not None and (upserts or deletes):
                calls.append(handle.submit("update_ledger", dict(upserts), list(deletes)))
        self._submit_progress(calls)

    def _submit_progress(self, calls: list[PendingCall]) -> None:
        """Computed counts not carried by a record sent above: {seq_id: count} per worker."""
        for wid, progress in self._manager.take_progress_updates().items():
            handle = self._handles.get(wid)
            if handle is not None:
                calls.append(handle.submit("update_progress", progress))

    @contextmanager
    def _planning(self) -> Iterator[_Batch]:
        """Plan under the table lock; await the submitted worker calls after releasing it.

        Every submitted call is awaited even when planning fails (a local worker would
        otherwise wait forever for its turn); the planning error wins over theirs.
        A lost worker becomes DATA_LOSS naming its sequences.
        """
        batch = _Batch()
        try:
            with self._lock:
                self._check_open()
                yield batch
        except BaseException:
            try:
                resolve_all(batch.calls)
            except WorkerLost as lost:
                self._lose_worker(lost.worker_id)
            except Exception:  # the planning error is the one to report
                log.exception("worker call failed after a failed plan")
            raise
        try:
            batch.results = resolve_all(batch.calls)
        except WorkerLost as exc:
            raise self._lose_worker(exc.worker_id) from exc

    def _lose_worker(self, worker_id: int) -> errors.DataLoss:
        with self._lock:
            if worker_id in self._handles:
                del self._handles[worker_id]
                removed = self._manager.remove_worker(worker_id)
                lost = sorted(self._spans.lose(int(s) for s in removed))
                for sid in lost:
                    if sid in self._seqs:
                        self._seqs[sid].lost = True
                fences: list[PendingCall] = []
                self._revoke_tickets(self._tickets.on_worker(worker_id), fences, reason="lost")
                try:
                    resolve_all(fences)
                except Exception:  # noqa: BLE001 - best effort: the other workers fence it
                    log.exception("closing the tickets of lost worker %d", worker_id)
                log.error("worker %d lost with sequences %s", worker_id, lost)
            else:
                lost = sorted(
                    s for s, st in self._seqs.items() if st.lost and st.worker_id == worker_id
                )
        return errors.DataLoss(f"worker {worker_id} was lost with sequences {lost}", lost)

    def _split_by_worker(
        self, seq_ids: list[int], q_lens: list[int]
    ) -> list[tuple[int, list[tuple[int, int]], list[int]]]:
        """[(worker_id, q row ranges, batch indices)] in first-seen order; ranges merged."""
        groups: dict[int, tuple[list[tuple[int, int]], list[int]]] = {}
        row = 0
        for i, (sid, q_len) in enumerate(zip(seq_ids, q_lens, strict=True)):
            rows, idx = groups.setdefault(self._seqs[sid].worker_id, ([], []))
            if rows and rows[-1][1] == row:
                rows[-1] = (rows[-1][0], row + q_len)
            else:
                rows.append((row, row + q_len))
            idx.append(i)
            row += q_len
        return [(wid, rows, idx) for wid, (rows, idx) in groups.items()]

    # ------------------------------------------------------------------ argument checks

    def _check_tokens(self, name: str, tokens: object, *, allow_empty: bool) -> list[int]:
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
                raise errors.InvalidArgument(f"{name} must be a 1-D int tensor")
            values = tokens.tolist()
        elif isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
            raise errors.InvalidArgument(f"{name} must be a list of token ids")
        else:
            values = [as_int(t) for t in tokens]
        if not values and not allow_empty:
            raise errors.InvalidArgument(f"{name} must not be empty")
        high = (self._vocab_size - 1) if self._vocab_size is not None else INT64_MAX
        for t in values:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= high:
                raise errors.InvalidArgument(
                    f"{name}: token ids must be ints in [0, {high}], got {t!r}"
                )
        return values

    def _exact_token_lists(self, tokens: Sequence[Sequence[int]]) -> list[list[int]] | None:
        """``tokens`` when it is lists of plain ints in range, checked in one pass (an
        append to many sequences); None otherwise (``_check_tokens`` then says what is
        wrong with which list)."""
        if set(map(type, tokens)) != {list}:
            return [] if not tokens else None
        high = (self._vocab_size - 1) if self._vocab_size is not None else INT64_MAX
        flat = [t for new in tokens for t in new]
        if flat and exact_ints(flat, 0, high) is None:
            return None
        return list(tokens)  # type: ignore[arg-type]


def _handles_by_id(
    workers: Mapping[int, WorkerHandle] | Iterable[WorkerHandle],
) -> dict[int, WorkerHandle]:
    if isinstance(workers, Mapping):
        return dict(workers)
    return {h.worker_id: h for h in workers}


def _usage_dict(usage: Any) -> dict[str, int]:
    return {k: int(getattr(usage, k)) for k in ("total", "used", "cached", "free")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def _gpu_blocks(cmd: Any) -> Iterable[int]:
    """The device-tier blocks a command reads, writes or frees (tickets name only those)."""
    if isinstance(cmd, FreeBlocks):
        return cmd.block_ids if cmd.tier is Tier.GPU else ()
    if isinstance(cmd, SwapIn):
        return (gpu for _cpu, gpu in cmd.pairs)
    if isinstance(cmd, SwapOut):
        return (gpu for gpu, _cpu in cmd.pairs)
    return (b for pair in cmd.pairs for b in pair)  # CopyBlocks: both ends


def _coalesce(commands: Iterable[Any]) -> list[Any]:
    """Merge runs of same-kind commands to one worker into one command (order kept)."""
    merged: list[Any] = []
    for cmd in commands:
        last = merged[-1] if merged else None
        if (
            last is not None
            and not isinstance(cmd, FreeBlocks)
            and type(last) is type(cmd)
            and last.worker_id == cmd.worker_id
            and _disjoint(last.pairs, cmd.pairs)
        ):
            merged[-1] = type(cmd)(cmd.worker_id, (*last.pairs, *cmd.pairs))
        else:
            merged.append(cmd)
    return merged


def _disjoint(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> bool:
    """No block of ``b`` is a destination in ``a``, and no destination of ``b`` is in ``a``."""
    a_src = {s for s, _ in a}
    a_dst = {d for _, d in a}
    return all(s not in a_dst and d not in a_dst and d not in a_src for s, d in b)
