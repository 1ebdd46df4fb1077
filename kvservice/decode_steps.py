"""Steps whose attention kernels the caller runs itself, on a worker in its own process.

A forward step normally calls ``attend`` once per layer, and the coordinator plans each
call into worker commands. A caller that holds the worker in its own process (the
embedded transport) can do better for a whole step: the coordinator plans the step once
for every layer (positions checked, shared blocks copied on write, every block brought
to the device tier), the caller launches all layers' kernels on the worker's pools (one
CUDA graph of the model's forward, say), and the coordinator then records the writes of
every layer at once. The page tables, prefix cache, copy-on-write and swapping stay the
coordinator's; only the per-layer calls go.

Invariants:
- The caller's ``launch`` runs under the coordinator's lock, after the planned commands
  were issued to the worker: no other call can move, swap or reuse the step's blocks
  before its kernels are queued on the worker's stream (later commands are ordered after
  them, as the worker's own calls are).
- Writes are recorded only after ``launch`` returns; a failed launch records nothing, so
  the step can be retried through the per-layer path (rewriting the same positions).
- Only a batch on one in-process worker, of sequences held whole (no segments), takes
  this path; otherwise ``run_local_step`` returns None before changing anything and the
  caller uses ``attend``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from kvservice.coordinator_workers import LocalWorkerHandle, PendingCall, WorkerLost, resolve_all
from kvservice.core.ids import DEFAULT_TENANT

if TYPE_CHECKING:
    from kvservice.coordinator import Coordinator

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LocalStep:
    """One planned step: the worker to launch on and, per sequence in batch order, its
    block table and length (new tokens included; they sit at the end)."""

    worker: Any
    block_tables: list[list[int]]
    seq_lens: list[int]


def local_handle(coord: Coordinator, worker_id: int) -> LocalWorkerHandle | None:
    """The handle of ``worker_id`` when its worker is in this process, else None."""
    handle = coord._handles.get(worker_id)
    return handle if isinstance(handle, LocalWorkerHandle) else None


def run_local_step(
    coord: Coordinator,
    seq_ids: Sequence[int],
    q_lens: Sequence[int],
    launch: Callable[[LocalStep], T],
    *,
    tenant: str = DEFAULT_TENANT,
) -> T | None:
    """Plan a step that writes and attends the sequences' last ``q_lens`` tokens in every
    layer, call ``launch`` with it (under the lock), then record every layer's writes.

    Returns ``launch``'s result, or None when the batch cannot take this path (it spans
    workers, a remote worker holds it, or a sequence is segmented); errors are the same
    as ``attend``'s (unknown sequence, a hole before the new tokens, no memory).
    """
    from kvservice.arg_checks import check_tenant

    tenant = check_tenant(tenant)
    _layer, ids, lens = coord._check_batch(0, seq_ids, q_lens)
    calls: list[PendingCall] = []
    with coord._lock:
        coord._check_open()
        if coord._spans.any_span(ids):
            return None
        starts, versions = coord._check_positions(None, ids, lens, tenant, True)
        groups = coord._split_by_worker(ids, lens)
        if len(groups) != 1:
            return None
        handle = local_handle(coord, groups[0][0])
        if handle is None:
            return None
        try:
            ((tables, seq_lens),) = coord._plan_groups(groups, ids, starts, lens, calls)
        finally:
            # A local worker runs queued calls when they are awaited. Every call planned
            # before this step (another caller's swap-out of a block since given to one of
            # these sequences, say) and this step's copies on write and swap-ins must be
            # on the worker's streams before the step's kernels: a cheap call last drains
            # the queue.
            calls.append(handle.submit("info"))
            _await(coord, calls)
        result = launch(LocalStep(handle.worker, tables, seq_lens))
    coord._record_writes(None, ids, starts, lens, versions)
    return result


def _await(coord: Coordinator, calls: list[PendingCall]) -> None:
    try:
        resolve_all(calls)
    except WorkerLost as exc:
        raise coord._lose_worker(exc.worker_id) from exc
