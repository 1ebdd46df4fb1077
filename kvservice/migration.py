"""A coordinator's multi-worker work: placement with prefix copies, migrating sequences,
draining a worker, rebalancing, and workers joining.

``Migrator`` belongs to one ``Coordinator`` (its ``migrator``) and runs under its table
lock, submitting through its planning batches like every other call: it is part of the
coordinator, kept in a file of its own, and reads the coordinator's private state.

- Placement: the coordinator's manager places new sequences with the ``affinity_load``
  policy (prefix affinity within a load slack). When another worker caches at least
  ``min_copy_blocks`` more blocks of the prompt's prefix than the chosen one,
  ``before_create`` copies them there first (a copy moves bytes once; recomputing the
  prefix runs the model over it), so the new sequence starts with them cached.
- ``migrate`` moves sequences to another worker; ``drain`` moves every sequence and pin
  off a worker, in sets that share blocks, each to the worker with most room, and then
  (by default) removes the worker from the tables; ``rebalance`` moves cold sets from the
  busiest worker to the least busy one while their loads differ by more than
  ``rebalance_threshold``. The blocks travel as ``kvservice.transfers`` says (GPU to GPU
  inside the transfer group, else through host memory); calls planned later on either
  worker run after the transfer. A transfer that fails (a worker died) loses only the
  sequences it carried: they answer DATA_LOSS.
- Ledgers: the destination gets the moved records with the usual updates; the source is
  told to drop them in the same batch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kvservice.coordinator_workers import PendingCall, WorkerHandle, WorkerLost
from kvservice.core import errors
from kvservice.core.commands import OutOfMemory, PoolSizes
from kvservice.core.ids import Tier
from kvservice.core.migration import (
    Migration,
    TransferBlocks,
    copy_prefix,
    place,
    plan_migration,
    plan_rebalance,
    sharing_groups,
)
from kvservice.spanning import SPAN_RECORD_BASE
from kvservice.transfers import TransferGroup, submit_transfer

if TYPE_CHECKING:
    from kvservice.coordinator import Coordinator

log = logging.getLogger(__name__)

DEFAULT_MIN_COPY_BLOCKS = 4
DEFAULT_REBALANCE_THRESHOLD = 0.2


class Migrator:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        min_copy_blocks: int = DEFAULT_MIN_COPY_BLOCKS,
        rebalance_threshold: float = DEFAULT_REBALANCE_THRESHOLD,
    ) -> None:
        self._c = coordinator
        self.min_copy_blocks = min_copy_blocks
        self.rebalance_threshold = rebalance_threshold
        self.group: TransferGroup | None = None
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ placement
    def before_create(self, tenant: str, tokens: Sequence[int], calls: list[PendingCall]) -> None:
        """Under the lock, just before ``create``: copy the prompt's cached prefix to the
        worker create will choose, when another worker caches at least ``min_copy_blocks``
        more blocks of it; create then finds them there."""
        manager = self._c._manager
        chosen = place(manager, tenant, tokens, min_copy_blocks=self.min_copy_blocks)
        if chosen is None or chosen.copy_from is None:
            return
        transfer = copy_prefix(manager, tenant, tokens, chosen.copy_from, chosen.worker_id)
        if transfer is not None:
            self._transfer(transfer, calls)
            self.counters["prefix_copies"] += 1
            self.counters["prefix_copy_blocks"] += len(transfer.blocks)

    # ------------------------------------------------------------------ moving sequences
    def migrate(self, seq_ids: Iterable[int], worker_id: int) -> dict[str, Any]:
        """Move sequences (service ids, all on one worker) and their pins to ``worker_id``."""
        ids = list(dict.fromkeys(int(s) for s in seq_ids))
        started = time.perf_counter()
        with _MovingBatch(self) as batch:
            for sid in ids:
                state = self._c._seqs.get(sid)
                if state is not None and state.lost:
                    raise errors.DataLoss(f"sequence {sid} was lost with its worker", [sid])
            result = plan_migration(self._c._manager, ids, worker_id)
            if isinstance(result, OutOfMemory):
                raise errors.ResourceExhausted(f"migrate: {result.reason}")
            self._apply(result, batch)
            self._finish_moves(batch, removed=None)
        return self._report(batch.moves, started)

    def drain(self, worker_id: int, *, remove: bool = True) -> dict[str, Any]:
        """Move every sequence and pin off ``worker_id``; then, with ``remove``, the worker
        leaves the tables (its handle is dropped; stopping the process is the caller's).
        RESOURCE_EXHAUSTED if the others cannot hold everything: what moved stays moved."""
        started = time.perf_counter()
        c = self._c
        with _MovingBatch(self) as batch:
            manager = c._manager
            if worker_id not in manager.workers:
                raise errors.NotFound(f"unknown worker {worker_id}")
            others = [w for w in manager.workers if w != worker_id]
            if not others:
                raise errors.FailedPrecondition(f"worker {worker_id} is the only worker")
            stuck: list[list[int]] = []
            for group in sharing_groups(manager, worker_id):
                usage = manager.usage()
                by_room = sorted(
                    others, key=lambda w: (-sum(u.free + u.cached for u in usage[w].values()), w)
                )
                for dst in by_room:
                    result = plan_migration(manager, group, dst)
                    if not isinstance(result, OutOfMemory):
                        self._apply(result, batch)
                        break
                else:
                    stuck.append(group)
            removed = None
            if not stuck and remove:
                lost = manager.remove_worker(worker_id)
                assert not lost, f"drained worker {worker_id} still held {lost}"
                removed = worker_id
                c._handles.pop(worker_id, None)
                c._infos.pop(worker_id, None)
                if self.group is not None:
                    self.group.ranks.pop(worker_id, None)
            self._finish_moves(batch, removed=removed)
        # Raised once the moves that did fit have run (their failures come first).
        if stuck:
            raise errors.ResourceExhausted(
                f"drain of worker {worker_id}: no room elsewhere for sequences {stuck}"
            )
        report = self._report(batch.moves, started)
        report["removed"] = removed is not None
        log.info("drained worker %d: %s", worker_id, report)
        return report

    def rebalance(self, *, threshold: float | None = None, max_rounds: int = 8) -> dict[str, Any]:
        """Move cold sets of sequences from the busiest to the least busy worker until their
        GPU-tier loads are within ``threshold`` (default ``rebalance_threshold``)."""
        started = time.perf_counter()
        moves: list[Migration] = []
        limit = self.rebalance_threshold if threshold is None else threshold
        for _ in range(max_rounds):
            with _MovingBatch(self) as batch:
                plan = plan_rebalance(self._c._manager, threshold=limit)
                if plan is not None:
                    _src, dst, groups = plan
                    for group in groups:
                        result = plan_migration(self._c._manager, group, dst)
                        if not isinstance(result, OutOfMemory):
                            self._apply(result, batch)
                self._finish_moves(batch, removed=None)
            moves += batch.moves
            if not batch.moves:
                break
        return self._report(moves, started)

    # ------------------------------------------------------------------ workers joining
    def add_worker(self, handle: WorkerHandle) -> None:
        """Place sequences on a new worker from now on (it must have the layout)."""
        c = self._c
        info = handle.call("info")
        if info.layout != c._layout:
            raise errors.InvalidArgument(
                f"worker {handle.worker_id} has layout {info.layout.key()}, expected {c._layout.key()}"
            )
        with c._lock:
            c._check_open()
            if handle.worker_id in c._handles:
                raise errors.FailedPrecondition(f"worker {handle.worker_id} is already serving")
            c._manager.add_worker(handle.worker_id, PoolSizes(info.num_gpu_blocks, info.num_cpu_blocks))
            c._handles[handle.worker_id] = handle
            c._infos[handle.worker_id] = info
            if self.group is not None:  # a new (or restarted) process is no member yet
                self.group.ranks.pop(handle.worker_id, None)
        log.info("worker %d joined on %s", handle.worker_id, info.device)

    def form_group(self) -> dict[int, int]:
        """(Re)form the transfer group over the coordinator's Ray workers; returns the ranks.
        Holds the table lock meanwhile, so no transfer is planned across the change."""
        c = self._c
        with c._lock:
            if self.group is None:
                self.group = TransferGroup()
            devices = {w: info.device for w, info in c._infos.items()}
            return self.group.form(dict(c._handles), devices)

    def stats(self) -> dict[str, Any]:
        group = self.group
        return {
            **{k: int(v) for k, v in sorted(self.counters.items())},
            "transfer_group": None
            if group is None or not group.ranks
            else {
                "ranks": dict(group.ranks),
                "backend": group.backend,
                "generation": group.generation,
                # Worker pairs that copy GPU-tier blocks through each other's mapped pools.
                "peer_pairs": sorted(sorted(pair) for pair in group.peer_pairs),
            },
        }

    # ------------------------------------------------------------------ internals
    def _transfer(self, transfer: TransferBlocks, calls: list[PendingCall]) -> None:
        self._c._steps.invalidate()  # blocks move: kept step plans may name old places
        tickets = self._c._tickets
        if tickets:  # and tickets naming the blocks that leave are revoked first
            gpu = Tier.GPU
            src = [b for st, b, _dt, _d in transfer.blocks if st == gpu]
            self._c._revoke_tickets(tickets.naming_blocks(transfer.src_worker_id, src), calls)
        path = submit_transfer(transfer, self._c._handles, self.group, calls)
        self.counters[f"transfers_{path}"] += 1
        self.counters["blocks_transferred"] += len(transfer.blocks)

    def _apply(self, migration: Migration, batch: _MovingBatch) -> None:
        """Submit one planned migration and point the coordinator's states at its destination."""
        batch.moves.append(migration)
        self._transfer(migration.transfer, batch.calls)
        c = self._c
        # Segments of long sequences follow their core sequences; a segment list whose
        # first segment moved gets its ledger record on the destination.
        for sid in c._spans.moved(migration.seq_ids, migration.dst_worker_id):
            batch.span_records.setdefault(migration.src_worker_id, []).append(SPAN_RECORD_BASE + sid)
        for sid in migration.seq_ids:
            state = c._seqs.get(sid)
            if state is not None:
                state.worker_id = migration.dst_worker_id
                state.writable = None  # the blocks changed: write plans start afresh
        self.counters["sequences_moved"] += len(migration.seq_ids)
        self.counters["blocks_shared_on_arrival"] += migration.num_shared_blocks

    def _finish_moves(self, batch: _MovingBatch, *, removed: int | None) -> None:
        """Ledger updates: the destinations' records with the usual batch, and each source
        (unless it was removed) drops the ids that left it."""
        c = self._c
        c._submit((cmd for m in batch.moves for cmd in m.commands), batch.calls)
        left: dict[int, list[int]] = {w: list(keys) for w, keys in batch.span_records.items()}
        for m in batch.moves:
            left.setdefault(m.src_worker_id, []).extend({*m.seq_ids, *m.pinned_ids})
        for src, ids in left.items():
            handle = c._handles.get(src)
            if handle is not None and src != removed:
                batch.calls.append(handle.submit("update_ledger", {}, sorted(ids)))

    def _lose_moved(self, moves: list[Migration]) -> list[int]:
        """After a failed transfer: the sequences it carried have no data; they are lost."""
        c = self._c
        lost: list[int] = []
        with c._lock:
            manager = c._manager
            for m in moves:
                for sid in {*m.seq_ids, *m.pinned_ids}:
                    if sid in manager._pins:
                        manager.unpin(sid)
                    if sid in manager._seqs:
                        manager.free(sid)
                        manager._lost.add(sid)
                    state = c._seqs.get(sid)
                    if state is not None:
                        state.lost = True
                        lost.append(sid)
        return sorted(lost)

    def _report(self, moves: list[Migration], started: float) -> dict[str, Any]:
        num_blocks = sum(len(m.transfer.blocks) for m in moves)
        return {
            "sequences": sum(len(m.seq_ids) for m in moves),
            "pins": sum(len(m.pinned_ids) for m in moves),
            "blocks": num_blocks,
            "bytes": num_blocks * self._c._layout.block_bytes,
            "blocks_shared_on_arrival": sum(m.num_shared_blocks for m in moves),
            "seconds": time.perf_counter() - started,
        }


class _MovingBatch:
    """``with``: one of the coordinator's planning batches, plus the migrations planned in
    it. If running the batch fails (a worker lost, a transfer refused), the sequences its
    transfers carried may lack their data: they are lost (DATA_LOSS naming them)."""

    def __init__(self, migrator: Migrator) -> None:
        self._migrator = migrator
        self._planning: Any = migrator._c._planning()
        self.moves: list[Migration] = []
        self.calls: list[PendingCall] = []
        self.span_records: dict[int, list[int]] = {}  # source -> segment-list keys that left

    def __enter__(self) -> _MovingBatch:
        self.calls = self._planning.__enter__().calls
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        error = exc
        try:
            self._planning.__exit__(exc_type, exc, tb)
        except BaseException as raised:  # noqa: BLE001 - sorted out below
            error = raised
        if error is None:
            return None
        if isinstance(error, WorkerLost):  # a local transfer met a dead worker while planning
            error = self._migrator._c._lose_worker(error.worker_id)
        lost = self._migrator._lose_moved(self.moves) if isinstance(error, Exception) else []
        if lost:
            seq_ids = sorted({*getattr(error, "seq_ids", ()), *lost})
            raise errors.DataLoss(f"moving sequences {lost} failed: {error}", seq_ids) from error
        if error is exc:
            return None  # the with statement raises it
        raise error
