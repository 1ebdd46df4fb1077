"""The coordinator's data path for batches holding sequences of several segments.

The new tokens (q rows) of a sequence are grouped by the segment that holds them
(``kvservice.spanning``). A group in segment s attends to every key of segments 0..s:
- on the worker holding segment s: one causal entry whose block table is that worker's
  segments up to s, in position order. All but s are full and older than every query of
  the group, so leaving other workers' segments out shifts positions uniformly: the
  causal mask is unchanged. The group's new K/V is written there (fused);
- on each other worker holding older segments: those keys are all older than every
  query, so unmasked: one single-query entry per row (a query at the last position of a
  sequence sees all of it) over that worker's segments, writing nothing (slot -1).
Each worker gets one call with all its entries and the tier of every block; it streams
the cold ones itself (``kvservice.workers.tiered``). The partial (out, lse) of each row
are merged here by log-sum-exp.

Hot segments are made GPU-resident and touched (so the LRU keeps them): the first
(attention sinks, system prompt), those overlapping the recent window, and those taking
new tokens. The others are read in whatever tier they are, untouched, so they are the
ones the core swaps out when it needs room.
Sliding window: a group sees only the segments its window reaches; they must all be on
the group's worker (one causal entry over them; FAILED_PRECONDITION otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvservice.core import errors
from kvservice.core.commands import OutOfMemory
from kvservice.core.ids import Tier
from kvservice.core.manager import KVCacheManager
from kvservice.spanning import Segment, SpanTable
from kvservice.workers import AttendPlan

if TYPE_CHECKING:
    from kvservice.coordinator import Coordinator


@dataclass(slots=True)
class WorkerPart:
    """The entries of one worker's call; ``rows`` are q rows, one per entry row."""

    rows: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # per row: write slot, -1 = none
    tables: list[list[int]] = field(default_factory=list)
    tiers: list[list[int]] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    read: dict[int, tuple[int, int]] = field(default_factory=dict)  # core id -> (hot, cold)

    def add(
        self, table: list[int], tiers: list[int], seq_len: int, rows: list[int], slots: list[int]
    ) -> None:
        self.tables.append(table)
        self.tiers.append(tiers)
        self.seq_lens.append(seq_len)
        self.q_lens.append(len(rows))
        self.rows += rows
        self.slots += slots

    def plan(self, writes: bool) -> AttendPlan:
        cold = any(Tier.CPU in t for t in self.tiers)
        return AttendPlan(
            self.tables,
            self.seq_lens,
            self.q_lens,
            self.slots if writes else None,
            self.tiers if cold else None,
        )


@dataclass(slots=True)
class _Group:
    segment: int  # index of the segment holding the group's tokens
    row: int  # first q row
    count: int
    position: int  # position of its first token


def plan_batch(
    manager: KVCacheManager,
    spans: SpanTable,
    seqs: list[tuple[int, int, int, int]],
    *,
    writes: bool,
    attend: bool,
    sliding_window: int | None,
    commands: list[Any],
) -> dict[int, WorkerPart]:
    """Worker parts for ``seqs`` = [(seq_id, worker_id, length, q_len)] (see module doc).

    Commands (copy on write, swaps) are appended to ``commands`` as they are planned.
    """
    bs = manager.block_size
    planned: list[tuple[list[Segment], list[_Group], list[list[int]]]] = []
    hot: dict[int, dict[int, None]] = {}  # worker -> core ids, in order
    row = 0
    for seq_id, worker_id, length, q_len in seqs:
        segs = spans.segments(seq_id, worker_id, length)
        first = length - q_len
        groups = [
            _Group(
                i,
                row + max(s.start, first) - first,
                s.end - max(s.start, first),
                max(s.start, first),
            )
            for i, s in enumerate(segs)
            if max(s.start, first) < s.end
        ]
        reach = [_reach(segs, g, sliding_window) for g in groups]
        wanted = {g.segment for g in groups}
        if attend:
            wanted.add(0)
            wanted.update(i for i, s in enumerate(segs) if s.end > length - spans.window_tokens)
            if sliding_window is not None:
                wanted.update(i for r in reach for i in r)
        for i in sorted(wanted):
            hot.setdefault(segs[i].worker_id, {})[segs[i].core_id] = None
        if writes:
            for g in groups:
                seg = segs[g.segment]
                start = g.position - seg.start
                wp = manager.prepare_write(seg.core_id, start, start + g.count)
                if isinstance(wp, OutOfMemory):
                    raise errors.ResourceExhausted(f"sequence {seq_id}: {wp.reason}")
                commands.extend(wp.commands)
        planned.append((segs, groups, reach))
        row += q_len

    tables: dict[int, tuple[list[int], list[int]]] = {}
    for core_ids in hot.values():
        plan = manager.prepare_attention(list(core_ids))
        if isinstance(plan, OutOfMemory):
            raise errors.ResourceExhausted(f"attention over long sequences: {plan.reason}")
        commands.extend(plan.commands)
        for core_id, resident in zip(core_ids, plan.block_tables, strict=True):
            tables[core_id] = (list(resident), [0] * len(resident))

    def table_of(seg: Segment) -> tuple[list[int], list[int]]:
        if seg.core_id not in tables:  # read where it lies, untouched
            view = manager.sequence(seg.core_id)
            tables[seg.core_id] = (view.block_ids, [int(t) for t in view.tiers])
        return tables[seg.core_id]

    parts: dict[int, WorkerPart] = {}
    for segs, groups, reach in planned:
        for g, seen in zip(groups, reach, strict=True):
            seg = segs[g.segment]
            own = table_of(seg)[0]
            rows = list(range(g.row, g.row + g.count))
            local = range(g.position - seg.start, g.position - seg.start + g.count)
            slots = [own[p // bs] * bs + p % bs for p in local] if writes else [-1] * g.count
            if not attend:
                part = parts.setdefault(seg.worker_id, WorkerPart())
                part.rows += rows
                part.slots += slots
                continue
            by_worker: dict[int, list[Segment]] = {}
            for i in seen:
                by_worker.setdefault(segs[i].worker_id, []).append(segs[i])
            for worker_id, mine in by_worker.items():
                part = parts.setdefault(worker_id, WorkerPart())
                table: list[int] = []
                tiers: list[int] = []
                for s in mine:
                    s_ids, s_tiers = table_of(s)
                    table += s_ids
                    tiers += s_tiers
                    part.read[s.core_id] = (s_tiers.count(0), s_tiers.count(1))
                seq_len = sum(s.length for s in mine)
                if worker_id == seg.worker_id:
                    part.add(table, tiers, seq_len, rows, slots)
                else:  # all older than every query: one unmasked entry per row
                    for r in rows:
                        part.add(table, tiers, seq_len, [r], [-1])
    return parts


def _reach(segs: list[Segment], group: _Group, window: int | None) -> list[int]:
    """Indices of the segments a group's queries see (in order)."""
    if window is None:
        return list(range(group.segment + 1))
    lowest = group.position - window + 1
    seen = [i for i in range(group.segment + 1) if segs[i].end > lowest]
    worker_id = segs[group.segment].worker_id
    if any(segs[i].worker_id != worker_id for i in seen):
        raise errors.FailedPrecondition(
            "sliding-window attention reaches segments of this sequence on several workers"
        )
    return seen


def merge_partials(
    dest: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results by log-sum-exp: part i (``out[i]``, ``lse[i]``) belongs to
    row ``dest[i]``. Returns (out [num_rows, H, D] in out's dtype, lse [num_rows, H] fp32)."""
    heads = lse.shape[1]
    lse = lse.float()
    index = dest[:, None].expand(-1, heads)
    top = torch.full((num_rows, heads), float("-inf"), device=lse.device)
    top = top.scatter_reduce(0, index, lse, "amax")
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse - top[dest])  # 0 for an empty part (lse -inf)
    total = torch.zeros((num_rows, heads), device=lse.device).index_add_(0, dest, weight)
    acc = torch.zeros((num_rows, *out.shape[1:]), device=out.device)
    acc.index_add_(0, dest, out.float() * weight[..., None])
    has = total > 0
    merged = acc / torch.where(has, total, torch.ones_like(total))[..., None]
    merged_lse = torch.where(
        has, top + torch.log(torch.where(has, total, torch.ones_like(total))), float("-inf")
    )
    return merged.to(out.dtype), merged_lse


def span_data_call(
    coord: Coordinator,
    method: str,
    layer: int,
    seq_ids: list[int],
    q_lens: list[int],
    tenant: str,
    *,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    options: dict[str, Any] | None,
) -> Any:
    """Coordinator._data_call for a batch with multi-segment sequences (same contract)."""
    writes = k is not None
    attend = method == "attend"
    options = options or {}
    window = options.get("sliding_window")
    num_rows = sum(q_lens)
    with coord._planning() as batch:
        starts, versions = coord._check_positions(layer, seq_ids, q_lens, tenant, writes)
        seqs = [
            (sid, coord._seqs[sid].worker_id, coord._seqs[sid].length, n)
            for sid, n in zip(seq_ids, q_lens, strict=True)
        ]
        commands: list[Any] = []
        try:
            parts = plan_batch(
                coord._manager, coord._spans, seqs,
                writes=writes, attend=attend, sliding_window=window, commands=commands,
            )  # fmt: skip
        finally:
            coord._submit(commands, batch.calls, ledger=bool(commands))
        first_data = len(batch.calls)
        like = q if q is not None else k
        assert like is not None
        for worker_id, part in parts.items():
            rows = torch.tensor(part.rows, dtype=torch.long, device=like.device)
            handle = coord._handles[worker_id]
            if not attend:
                assert k is not None and v is not None
                call = handle.submit("write_kv", layer, part.slots, k[rows], v[rows])
            else:
                assert q is not None
                call = handle.submit(
                    "attend", layer, part.plan(writes), q[rows],
                    None if k is None else k[rows], None if v is None else v[rows],
                    scale=options.get("scale"), sliding_window=window, return_lse=True,
                )  # fmt: skip
            batch.calls.append(call)
    if writes:
        coord._record_writes(layer, seq_ids, starts, q_lens, versions)
    if not attend:
        return None
    assert q is not None
    results = batch.results[first_data : first_data + len(parts)]
    dest = torch.tensor([r for p in parts.values() for r in p.rows], device=q.device)
    out, lse = merge_partials(
        dest, torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results]), num_rows
    )
    _count_reads(coord, parts.values())
    return (out, lse) if options.get("return_lse") else out


def _count_reads(coord: Coordinator, parts: Any) -> None:
    layout = coord._layout
    per_block = layout.block_bytes // layout.num_layers
    hot = cold = 0
    for part in parts:
        for n_hot, n_cold in part.read.values():
            hot += n_hot
            cold += n_cold
    coord.metrics.count_attention_reads(hot * per_block, cold * per_block)
