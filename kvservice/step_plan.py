"""Attention plans reused across the layers of one step.

Every layer of a forward step calls ``attend`` with the same sequences and query lengths,
and between two layers nothing about those sequences changes: the block tables, lengths,
write positions and residency that the first layer's call planned hold for the others.
``StepPlans`` keeps what that call planned, and a later call with the same tenant,
sequences, query lengths and write flag skips the planning: it checks the layer's own
preconditions and submits the same immutable ``AttendPlan`` objects (which the workers
recognise, so they check and upload them once per step too).

Invariants (what makes a kept plan still true when it is used):
- Sequences change through ``append``, ``fork`` and ``truncate`` (the coordinator bumps
  their version), ``free`` and recovery (another state object), worker loss (``lost``)
  and migration (another worker): a hit needs every sequence's state to be the same
  object, not lost, at the same version and on the same worker.
- Blocks move only through commands (copy on write, swap out, swap in): the coordinator
  calls ``invalidate`` whenever it submits one, and every kept plan is dropped.
- Hits are checked and submitted under the coordinator's lock, like any planned call, so
  calls to one worker still run in planning order.
- Written positions are recorded per layer as on the full path; the prefix cache is fed
  (``_record_writes``) once every layer has gone through the kept plan, and on every
  full-path call, so ``computed`` lags at most within a step, never passes what is written.
- A write into computed positions (a rewrite) reuses a kept plan only while the
  sequence's computed count is what it was when the plan was made. The full path made
  the range private and took it out of the prefix cache (copy on write, uncache); a
  block shares again only through a fork (a new version) or a prefix-cache hit, and it
  re-enters the cache only through ``mark_computed``, which the coordinator calls only
  when the computed count grows. So an unchanged count keeps the range private.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvservice.coordinator_workers import WorkerLost, resolve_all
from kvservice.workers import AttendPlan

if TYPE_CHECKING:
    from kvservice.coordinator import Coordinator, _SeqState

_INT64_MAX = 2**63 - 1

# (tenant, seq_ids, q_lens, writes)
_Key = tuple[str, tuple[int, ...], tuple[int, ...], bool]


def exact_ints(values: object, low: int, high: int = _INT64_MAX) -> list[int] | None:
    """``values`` as a list when it is a list or tuple of plain ints in ``[low, high]``;
    None otherwise (the caller's per-element checks then say what is wrong)."""
    if type(values) not in (list, tuple):
        return None
    if not values:
        return []
    if set(map(type, values)) != {int}:  # type: ignore[call-overload]
        return None
    if min(values) < low or max(values) > high:  # type: ignore[type-var, call-overload]
        return None
    return list(values)  # type: ignore[call-overload]


def frozen_plan(
    tables: Sequence[Sequence[int]], seq_lens: Sequence[int], q_lens: Sequence[int]
) -> AttendPlan:
    """An AttendPlan of tuples: immutable, so a worker may keep its checked form."""
    return AttendPlan(tuple(map(tuple, tables)), tuple(seq_lens), tuple(q_lens), None)


@dataclass(slots=True)
class _Step:
    generation: int
    seq_ids: list[int]
    q_lens: list[int]
    starts: list[int]
    versions: list[int]
    # (seq_id, state, version, worker_id, first new position, length, computed count)
    seqs: list[tuple[int, _SeqState, int, int, int, int, int]]
    # (worker_id, q row ranges, plan), one per worker
    groups: list[tuple[int, list[tuple[int, int]], AttendPlan]]
    num_rows: int
    layers: set[int] = field(default_factory=set)


class StepPlans:
    """The kept plans of a coordinator (a few: one per batch that is stepping)."""

    def __init__(self, num_layers: int, size: int = 4) -> None:
        self._num_layers = num_layers
        self._size = size
        self._steps: dict[_Key, _Step] = {}
        self._generation = 0

    def invalidate(self) -> None:
        """Blocks moved: no kept plan may be used again."""
        self._generation += 1
        self._steps.clear()

    def remember(
        self,
        coord: Coordinator,
        layer: int,
        tenant: str,
        seq_ids: list[int],
        q_lens: list[int],
        writes: bool,
        starts: list[int],
        versions: list[int],
        groups: list[tuple[int, list[tuple[int, int]], list[int]]],
        plans: list[tuple[list[list[int]], list[int]]],
    ) -> list[AttendPlan]:
        """Keep a plan just made by the full path (under the lock, its commands submitted);
        returns the AttendPlan of each group, to be sent now and on every hit."""
        frozen = [
            frozen_plan(tables, seq_lens, [q_lens[i] for i in idx])
            for (_wid, _rows, idx), (tables, seq_lens) in zip(groups, plans, strict=True)
        ]
        seqs = []
        for sid, q_len, start, version in zip(seq_ids, q_lens, starts, versions, strict=True):
            state = coord._seqs[sid]
            seqs.append(
                (sid, state, version, state.worker_id, start, start + q_len, state.computed)
            )
        key = (tenant, tuple(seq_ids), tuple(q_lens), writes)
        self._steps.pop(key, None)
        if len(self._steps) >= self._size:
            del self._steps[next(iter(self._steps))]  # the oldest
        self._steps[key] = _Step(
            generation=self._generation,
            seq_ids=seq_ids,
            q_lens=q_lens,
            starts=starts,
            versions=versions,
            seqs=seqs,
            groups=[
                (wid, rows, plan) for (wid, rows, _idx), plan in zip(groups, frozen, strict=True)
            ],
            num_rows=sum(q_lens),
            layers={layer} if writes else set(),
        )
        return frozen

    def attend(
        self,
        coord: Coordinator,
        layer: int,
        seq_ids: list[int],
        q_lens: list[int],
        tenant: str,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        options: dict[str, Any],
    ) -> Any:
        """The attend call through a kept plan; None when there is none that still holds
        (the caller then plans in full, which also reports any error)."""
        writes = k is not None
        step = self._steps.get((tenant, tuple(seq_ids), tuple(q_lens), writes))
        if step is None:
            return None
        from kvservice.data_plane import _merge_results, _rows

        with coord._lock:
            coord._check_open()
            if step.generation != self._generation or not _still_holds(coord, step, layer, writes):
                return None
            calls = []
            for wid, rows, plan in step.groups:
                q_rows, k_rows, v_rows = _rows(q, rows), _rows(k, rows), _rows(v, rows)
                handle = coord._handles[wid]
                calls.append(
                    handle.submit("attend", layer, plan, q_rows, k_rows, v_rows, **options)
                )
        try:
            results = resolve_all(calls)
        except WorkerLost as exc:
            raise coord._lose_worker(exc.worker_id) from exc
        if writes:
            self._record(coord, step, layer)
        groups: list[tuple[int, list[tuple[int, int]], list[int]]] = [
            (wid, rows, []) for wid, rows, _plan in step.groups
        ]
        return _merge_results(results, groups, step.num_rows, bool(options["return_lse"]))

    def _record(self, coord: Coordinator, step: _Step, layer: int) -> None:
        step.layers.add(layer)
        if len(step.layers) >= self._num_layers:
            # Every layer went through: the full record feeds the prefix cache.
            coord._record_writes(layer, step.seq_ids, step.starts, step.q_lens, step.versions)
            return
        with coord._lock:
            for _sid, state, version, _wid, start, end, _computed in step.seqs:
                if state.lost or state.version != version:
                    continue  # lost or changed meanwhile (a freed state is nobody's now)
                written = state.written
                if start <= written[layer] < end:
                    written[layer] = end


def _still_holds(coord: Coordinator, step: _Step, layer: int, writes: bool) -> bool:
    """Every sequence unchanged since the plan was made, and the layer's own precondition
    (no hole before the new tokens; for a read, every position written) met. A write into
    computed positions plans in full once the computed count moved: blocks in its range
    may have entered the prefix cache since, and a cache hit shares a block without
    changing any version (see the module docstring)."""
    seqs = coord._seqs
    for sid, state, version, wid, start, end, computed in step.seqs:
        if (
            seqs.get(sid) is not state
            or state.lost
            or state.version != version
            or state.worker_id != wid
        ):
            return False
        if state.tracked and state.written[layer] < (start if writes else end):
            return False
        if writes and start < state.computed and state.computed != computed:
            return False  # rewrites positions that may have been cached since the plan
    return True
