"""The coordinator's data plane: WriteKV and Attend planned into worker calls.

``DataPlane`` is a part of ``Coordinator`` (a mixin: it uses the coordinator's tables,
lock and worker handles). A call is checked, planned under the lock into worker commands
(copies on write, swap-ins) and per-worker attention plans, submitted in planning order,
and its writes recorded per layer once the workers answered; the other layers of a step
reuse the first layer's plans (``kvservice.step_plan``). Sequences held as segments go
through ``kvservice.span_attention``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from kvservice.arg_checks import check_ids, check_int, check_tenant
from kvservice.coordinator_workers import PendingCall, WorkerLost, resolve_all
from kvservice.core import errors
from kvservice.core.commands import OutOfMemory
from kvservice.core.ids import DEFAULT_TENANT
from kvservice.core.layout import Layout
from kvservice.span_attention import span_data_call
from kvservice.step_plan import exact_ints


class DataPlane:
    """``write_kv`` and ``attend`` of ``Coordinator`` and what they share."""

    if TYPE_CHECKING:  # provided by Coordinator
        _layout: Layout
        _dtype: torch.dtype
        _handles: dict[int, Any]
        _seqs: dict[int, Any]
        _spans: Any
        _steps: Any
        _manager: Any
        _lock: Any
        metrics: Any

        def _own(self, seq_id: int, tenant: str, *, allow_lost: bool = False) -> Any: ...
        def _planning(self) -> AbstractContextManager[Any]: ...
        def _submit(
            self, commands: Any, calls: list[PendingCall], *, ledger: bool = True
        ) -> None: ...
        def _submit_progress(self, calls: list[PendingCall]) -> None: ...
        def _lose_worker(self, worker_id: int) -> errors.DataLoss: ...
        def _split_by_worker(
            self, seq_ids: list[int], q_lens: list[int]
        ) -> list[tuple[int, list[tuple[int, int]], list[int]]]: ...

    def write_kv(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        with self.metrics.time_call("write_kv"):
            tenant = check_tenant(tenant)
            layer, seq_ids, q_lens = self._check_batch(layer, seq_ids, q_lens)
            num_rows = sum(q_lens)
            self._check_tensor("k", k, (num_rows, self._layout.num_kv_heads))
            self._check_tensor("v", v, (num_rows, self._layout.num_kv_heads))
            self._data_call("write_kv", layer, seq_ids, q_lens, tenant, q=None, k=k, v=v)

    def attend(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
        tenant: str = DEFAULT_TENANT,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with self.metrics.time_call("attend"):
            tenant = check_tenant(tenant)
            layer, seq_ids, q_lens = self._check_batch(layer, seq_ids, q_lens)
            num_rows = sum(q_lens)
            self._check_tensor("q", q, (num_rows, None))
            if q.shape[1] == 0 or q.shape[1] % self._layout.num_kv_heads:
                raise errors.InvalidArgument(
                    f"q has {q.shape[1]} heads; need a positive multiple of "
                    f"{self._layout.num_kv_heads}"
                )
            if (k_new is None) != (v_new is None):
                raise errors.InvalidArgument("give both k_new and v_new, or neither")
            if k_new is not None:
                self._check_tensor("k_new", k_new, (num_rows, self._layout.num_kv_heads))
                self._check_tensor("v_new", v_new, (num_rows, self._layout.num_kv_heads))
            if sliding_window is not None:
                sliding_window = check_int("sliding_window", sliding_window, low=1, high=2**31 - 1)
            if scale is not None and (
                isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0
            ):
                raise errors.InvalidArgument(f"scale must be a positive number, got {scale!r}")
            if not isinstance(return_lse, bool):
                raise errors.InvalidArgument(f"return_lse must be a bool, got {return_lse!r}")
            options = {"scale": scale, "sliding_window": sliding_window, "return_lse": return_lse}
            return self._data_call(
                "attend", layer, seq_ids, q_lens, tenant, q=q, k=k_new, v=v_new, options=options
            )

    def _data_call(
        self,
        method: str,
        layer: int,
        seq_ids: list[int],
        q_lens: list[int],
        tenant: str,
        *,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        options: dict[str, Any] | None = None,
    ) -> Any:
        """Plan, submit and await one write_kv or attend batch, possibly over several workers."""
        if self._spans.any_span(seq_ids):
            coord: Any = self  # a Coordinator: DataPlane is one of its parts
            return span_data_call(
                coord, method, layer, seq_ids, q_lens, tenant, q=q, k=k, v=v, options=options
            )
        if method == "attend":
            kept = self._steps.attend(self, layer, seq_ids, q_lens, tenant, q, k, v, options or {})
            if kept is not None:
                return kept
        writes = k is not None
        num_rows = sum(q_lens)
        with self._planning() as batch:
            starts, versions = self._check_positions(layer, seq_ids, q_lens, tenant, writes)
            groups = self._split_by_worker(seq_ids, q_lens)
            plans = self._plan_groups(
                groups, seq_ids, starts if writes else None, q_lens, batch.calls
            )
            first_data = len(batch.calls)
            # The other layers of this step reuse these plans (kvservice.step_plan).
            kept_plans = iter(
                self._steps.remember(
                    self, layer, tenant, seq_ids, q_lens, writes, starts, versions, groups, plans
                )
                if method == "attend"
                else ()
            )
            for (wid, rows, idx), (tables, seq_lens) in zip(groups, plans, strict=True):
                handle = self._handles[wid]
                group_q_lens = [q_lens[i] for i in idx]
                if method == "write_kv":
                    slots = _slots(tables, seq_lens, group_q_lens, self._layout.block_size)
                    call = handle.submit("write_kv", layer, slots, _rows(k, rows), _rows(v, rows))
                else:
                    plan = next(kept_plans)
                    call = handle.submit(
                        "attend", layer, plan, _rows(q, rows), _rows(k, rows), _rows(v, rows),
                        **(options or {}),
                    )  # fmt: skip
                batch.calls.append(call)
        if writes:
            self._record_writes(layer, seq_ids, starts, q_lens, versions)
        if method == "write_kv":
            return None
        results = batch.results[first_data : first_data + len(groups)]
        return _merge_results(results, groups, num_rows, bool(options and options["return_lse"]))

    def _plan_groups(
        self,
        groups: list[tuple[int, list[tuple[int, int]], list[int]]],
        seq_ids: list[int],
        starts: list[int] | None,
        q_lens: list[int],
        calls: list[PendingCall],
    ) -> list[tuple[list[list[int]], list[int]]]:
        """``_plan_group`` for each worker's group (``_split_by_worker``), its commands
        submitted to ``calls`` even when a later group fails (the pools follow the tables).
        ``starts`` None: nothing is written."""
        commands: list[Any] = []
        try:
            return [
                self._plan_group(
                    [seq_ids[i] for i in idx],
                    None if starts is None else [starts[i] for i in idx],
                    [q_lens[i] for i in idx],
                    commands,
                )
                for _wid, _rows, idx in groups
            ]
        finally:
            # Ledger records change here only through block moves (COW, swap-in); without
            # any, the pending updates (computed counts) wait for the next call that moves
            # or allocates, keeping the per-layer path free of them.
            self._submit(commands, calls, ledger=bool(commands))

    def _plan_group(
        self,
        seq_ids: list[int],
        starts: list[int] | None,
        q_lens: list[int],
        commands: list[Any],
    ) -> tuple[list[list[int]], list[int]]:
        """Block tables for sequences of one worker, made GPU-resident and writable.

        prepare_write copies shared blocks in the written range (COW); prepare_attention
        then brings every sequence to the GPU tier and gives the final tables, from which
        the write slots are derived (a later write plan may have moved an earlier one).
        """
        if starts is not None:
            for sid, start, q_len in zip(seq_ids, starts, q_lens, strict=True):
                state = self._seqs[sid]
                key = (state.version, start, start + q_len, state.computed)
                # The layers of one step write the same range: once it is writable (its
                # shared blocks copied, cached ones uncached), it stays so until the
                # sequence changes or its computed count moves (blocks re-enter the prefix
                # cache only then; kvservice.step_plan says why).
                if state.writable == key:
                    continue
                wp = self._manager.prepare_write(sid, start, start + q_len)
                if isinstance(wp, OutOfMemory):
                    raise errors.ResourceExhausted(f"sequence {sid}: {wp.reason}")
                commands.extend(wp.commands)
                state.writable = key
        plan = self._manager.prepare_attention(seq_ids)
        if isinstance(plan, OutOfMemory):
            raise errors.ResourceExhausted(f"attention over {seq_ids}: {plan.reason}")
        commands.extend(plan.commands)
        return [list(t) for t in plan.block_tables], [int(n) for n in plan.seq_lens]

    def _check_positions(
        self, layer: int | None, seq_ids: list[int], q_lens: list[int], tenant: str, writes: bool
    ) -> tuple[list[int], list[int]]:
        """First written position and version of each sequence, after the state checks
        (of ``layer``, or with None of every layer: a step planned once for all of them)."""
        starts: list[int] = []
        versions: list[int] = []
        for sid, q_len in zip(seq_ids, q_lens, strict=True):
            state = self._own(sid, tenant)
            length = state.length
            if q_len > length:
                raise errors.FailedPrecondition(
                    f"sequence {sid} has {length} tokens; q_len {q_len} is past its start"
                )
            start = length - q_len
            have = min(state.written) if layer is None else state.written[layer]
            where = "every layer" if layer is None else f"layer {layer}"
            if state.tracked and writes and start > have:
                raise errors.FailedPrecondition(
                    f"sequence {sid}, {where}: positions {have}..{start - 1} have no K/V; "
                    f"write them first"
                )
            if state.tracked and not writes and have < length:
                raise errors.FailedPrecondition(
                    f"sequence {sid}, {where}: positions {have}..{length - 1} have no K/V; "
                    f"pass k_new/v_new or write them first"
                )
            starts.append(start)
            versions.append(state.version)
        return starts, versions

    def _record_writes(
        self,
        layer: int | None,
        seq_ids: list[int],
        starts: list[int],
        q_lens: list[int],
        versions: list[int],
    ) -> None:
        """After a successful write: advance written[layer] (every layer's with None),
        feed the prefix cache.

        When a sequence's computed count advances (the step's last layer is written), the
        ledgers learn it at once, so a coordinator rebuilt after a crash reports it too: as
        a compact progress update, unless the record changed otherwise (new prefix hashes).
        """
        calls: list[PendingCall] = []
        advanced = False
        with self._lock:
            for sid, start, q_len, version in zip(seq_ids, starts, q_lens, versions, strict=True):
                state = self._seqs.get(sid)
                if state is None or state.lost or state.version != version:
                    continue  # freed, lost or truncated meanwhile
                written, end = state.written, start + q_len
                for i in range(len(written)) if layer is None else (layer,):
                    if start <= written[i] < end:
                        written[i] = end
                computed = min(written)
                if computed > state.computed:
                    self._spans.mark_computed(sid, computed)
                    state.computed = computed
                    advanced = True
            if advanced:
                # Only the compact counts: full records (new prefix hashes) ride on the next
                # call that moves or allocates blocks, so a long prefill in many chunks does
                # not re-send whole token lists after each chunk. A crash in between loses
                # cache entries, never data.
                self._submit_progress(calls)
        try:
            resolve_all(calls)
        except WorkerLost as exc:
            raise self._lose_worker(exc.worker_id) from exc

    def _check_batch(
        self, layer: object, seq_ids: object, q_lens: object
    ) -> tuple[int, list[int], list[int]]:
        layer = check_int("layer", layer, low=0, high=self._layout.num_layers - 1)
        ids = check_ids(seq_ids, unique=True)
        if not ids:
            raise errors.InvalidArgument("seq_ids must not be empty")
        if isinstance(q_lens, str | bytes) or not isinstance(q_lens, Sequence | torch.Tensor):
            raise errors.InvalidArgument("q_lens must be a list of ints")
        lens = exact_ints(q_lens, 1)
        if lens is None:
            lens = [check_int(f"q_lens[{i}]", x, low=1) for i, x in enumerate(q_lens)]
        if len(lens) != len(ids):
            raise errors.InvalidArgument(f"{len(ids)} seq_ids but {len(lens)} q_lens")
        return layer, ids, lens

    def _check_tensor(self, name: str, t: object, lead: tuple[int, int | None]) -> None:
        """A [rows, heads, head_dim] tensor of the layout's dtype (heads None = any)."""
        if not isinstance(t, torch.Tensor):
            raise errors.InvalidArgument(f"{name} must be a tensor, got {type(t).__name__}")
        rows, heads = lead
        shape = tuple(t.shape)
        if (
            len(shape) != 3
            or shape[0] != rows
            or (heads is not None and shape[1] != heads)
            or shape[2] != self._layout.head_dim
        ):
            want = (rows, "num_q_heads" if heads is None else heads, self._layout.head_dim)
            raise errors.InvalidArgument(f"{name} has shape {shape}, expected {want}")
        if t.dtype != self._dtype:
            raise errors.InvalidArgument(
                f"{name} is {t.dtype}; the cache holds {self._layout.dtype}"
            )


def _slots(
    tables: list[list[int]], seq_lens: list[int], q_lens: list[int], block_size: int
) -> list[int]:
    """Slots of each sequence's last q_len positions, from its block table."""
    slots: list[int] = []
    for table, length, q_len in zip(tables, seq_lens, q_lens, strict=True):
        for pos in range(length - q_len, length):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    return slots


def _rows(t: torch.Tensor | None, ranges: list[tuple[int, int]]) -> torch.Tensor | None:
    """The rows of ``t`` in ``ranges``: ``t`` itself, a view for one range, else a copy."""
    if t is None:
        return None
    if len(ranges) == 1:
        start, end = ranges[0]
        return t if (start == 0 and end == t.shape[0]) else t[start:end]
    return torch.cat([t[a:b] for a, b in ranges])


def _merge_results(
    results: list[Any],
    groups: list[tuple[int, list[tuple[int, int]], list[int]]],
    num_rows: int,
    return_lse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Put each worker's output rows back in batch order."""
    if len(groups) == 1:
        return results[0]
    parts = [(r[0], r[1]) if return_lse else (r, None) for r in results]
    first_out, first_lse = parts[0]
    out = first_out.new_empty((num_rows, *first_out.shape[1:]))
    lse = first_lse.new_empty((num_rows, *first_lse.shape[1:])) if first_lse is not None else None
    for (_, rows, _), (o, part_lse) in zip(groups, parts, strict=True):
        offset = 0
        for a, b in rows:
            out[a:b] = o[offset : offset + b - a]
            if lse is not None and part_lse is not None:
                lse[a:b] = part_lse[offset : offset + b - a]
            offset += b - a
    return (out, lse) if lse is not None else out
