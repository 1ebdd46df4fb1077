"""Attention over sequences whose pages are split between the GPU tier and the CPU tier.

A plan entry may name a tier per block (``AttendPlan.block_tiers``: 0 = an id in the GPU
pool, 1 = an id in the CPU pool). Attention over such a batch never swaps the cold pages
in; it runs in two parts whose (out, lse) are merged by log-sum-exp:
- hot: each entry's GPU blocks, in order, as one shorter *virtual* sequence, through the
  worker's ordinary attention path (the fused write of the new K/V included);
- cold: the batch's distinct CPU blocks, this layer's slice only, streamed in chunks into
  two GPU staging buffers on the worker's copy stream. While chunk i+1 (and the hot part)
  runs, the decode kernel attends over chunk i; each chunk's result is merged into an fp32
  accumulator. On a CPU worker the staging copy is a plain copy and the same code runs.

Why it is exact:
- an entry's cold keys are all older than its queries, so they are unmasked; dropping them
  from the entry's table shifts every later position by the same amount, so the causal
  mask of the hot part is unchanged (its queries stay its last positions);
- attention over a union of disjoint key sets is the LSE-weighted mix of the attention
  over each set, in any order, so a CPU block is streamed once per call (ascending ids:
  runs of consecutive blocks stay consecutive) even when several entries share it.

Rules, else InvalidArgument: an entry with several queries keeps every block at or after
its first query position hot; a token being written lies in a GPU block; with a sliding
window, blocks inside any query's window are hot (cold blocks outside every window are
skipped, never streamed).

Ordering: a split's chunk tables are built and uploaded once (one copy, queued before
any staging copy) and kept with the split for the other layers of the step. The staging
copies run on the worker's swap stream, after the swaps already queued there (which may be
filling the cold blocks); the copy into a staging buffer waits only for the event of the
attention that last read that buffer, and each chunk's attention waits only for its own
copy's event, so the attention over chunk i runs under the copy of chunk i+1. Nothing in
the loop blocks the host. The copies are recorded as pending reads of their CPU blocks, so
a later host write of those blocks waits for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import kvservice.kernels as kernels
import torch
from kvservice.workers.plan import (
    AttendPlan,
    _is_frozen,
    _used_table,
    as_int_tensor,
    plan_lengths,
)

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier

if TYPE_CHECKING:
    from kvservice.workers.worker import Worker

logger = logging.getLogger(__name__)

# Bytes of one staging buffer (two are used). 64 MiB moves in ~1.2 ms over PCIe 5: long
# enough to hide the per-chunk launches, small beside a GPU's memory.
DEFAULT_STAGING_BYTES = 64 << 20
COPY_MODES = ("auto", "kernel", "memcpy2d")
# "auto" uses the copy engine (2-D memcpy per run of consecutive CPU blocks) when a chunk's
# runs average at least this many blocks; shorter runs cost a call each, and the gather
# kernel (one launch, reading host memory directly) wins.
_MIN_MEAN_RUN = 8


_GPU = int(Tier.GPU)
# Answers for the block_tiers of the last few frozen plans (tuples of tuples, which cannot
# change): the layers of a step ask about one plan object, so an all-GPU plan costs one
# dict lookup per layer, not a scan of its tiers.
_COLD_ANSWERS: dict[int, tuple[object, bool]] = {}
_COLD_ANSWERS_SIZE = 8


def has_cold_blocks(plan: object) -> bool:
    """Whether ``plan`` names any CPU-tier block (cheap: no plan checks)."""
    tiers = getattr(plan, "block_tiers", None)
    if tiers is None:
        return False
    if isinstance(tiers, torch.Tensor):
        return bool((tiers != _GPU).any())
    hit = _COLD_ANSWERS.get(id(tiers))
    if hit is not None and hit[0] is tiers:
        return hit[1]
    cold = any(row.count(_GPU) != len(row) for row in tiers)  # C-level scans
    if type(tiers) is tuple and all(type(row) is tuple for row in tiers):
        if len(_COLD_ANSWERS) >= _COLD_ANSWERS_SIZE:
            _COLD_ANSWERS.clear()
        _COLD_ANSWERS[id(tiers)] = (tiers, cold)
    return cold


@dataclass(slots=True)
class TieredSplit:
    """A tiered plan cut into its hot plan and its cold references (host tensors)."""

    hot_plan: AttendPlan | None  # entries with at least one hot key; GPU block ids
    hot_rows: torch.Tensor  # [T_hot] q rows of hot_plan, in its order
    cold_ids: torch.Tensor  # [N] distinct CPU blocks, ascending: the stream order
    cold_entry: torch.Tensor  # [M] entry of each (entry, cold block) reference
    cold_index: torch.Tensor  # [M] its block's index in cold_ids
    cold_valid: torch.Tensor  # [M] tokens of that block the entry reads (< bs: its last)
    q_lens: torch.Tensor  # [B]
    cu_q_lens: torch.Tensor  # [B + 1]
    window_plan: AttendPlan | None = None  # sliding window: the visible, all-hot suffix


@dataclass(slots=True)
class ChunkPlan:
    """Decode over one staged chunk: one table row per q row that reads the chunk."""

    ids: torch.Tensor  # [n] CPU blocks staged, in staging-slot order
    rows: torch.Tensor  # [R] q rows
    block_tables: torch.Tensor  # [R, width] int32 staging slots
    seq_lens: torch.Tensor  # [R] int32 keys of the chunk each row reads


def split_plan(
    plan: AttendPlan,
    *,
    block_size: int,
    num_gpu_blocks: int,
    num_cpu_blocks: int,
    num_q_rows: int,
    writes: bool,
    sliding_window: int | None,
) -> TieredSplit:
    """Check a plan with block tiers and cut it into its hot and cold parts."""
    seq_lens, q_lens = plan_lengths(plan, num_q_rows)
    batch = seq_lens.numel()
    bs = block_size
    needed = (seq_lens + bs - 1) // bs
    width = int(needed.max())
    table, _ = _used_table(plan.block_tables, needed, width)
    tiers, _ = _used_table(plan.block_tiers, needed, width)
    used = torch.arange(width)[None, :] < needed[:, None]
    if bool(((tiers != int(Tier.GPU)) & (tiers != int(Tier.CPU)) & used).any()):
        raise InvalidArgument("block_tiers entries must be 0 (GPU) or 1 (CPU)")
    cold = used & (tiers == int(Tier.CPU))
    hot = used & ~cold
    hot_entry, hot_col = torch.nonzero(hot, as_tuple=True)
    cold_entry, cold_col = torch.nonzero(cold, as_tuple=True)
    hot_ids, cold_refs = table[hot_entry, hot_col], table[cold_entry, cold_col]
    for name, ids, limit in (("GPU", hot_ids, num_gpu_blocks), ("CPU", cold_refs, num_cpu_blocks)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
            bad = int(ids[(ids < 0) | (ids >= limit)][0])
            raise InvalidArgument(f"{name} block id {bad} is outside [0, {limit})")

    cu_q_lens = torch.zeros(batch + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=cu_q_lens[1:])
    block_start = torch.arange(width)[None, :] * bs
    first_query = (seq_lens - q_lens)[:, None]
    if sliding_window is not None:
        return _window_split(plan, table, cold, seq_lens, q_lens, cu_q_lens, bs, sliding_window)

    # Several queries: cold keys must all precede the first query (they are then unmasked).
    masked_cold = cold & (q_lens[:, None] > 1) & (block_start + bs > first_query)
    if bool(masked_cold.any()):
        entry = int(torch.nonzero(masked_cold)[0, 0])
        raise InvalidArgument(
            f"entry {entry}: a CPU-tier block holds a position at or after its first query; "
            "blocks of an extend's query positions must be in the GPU tier"
        )
    written = _written_rows(plan, num_q_rows, writes)
    if written is not None:
        row_entry = torch.repeat_interleave(torch.arange(batch), q_lens)
        row_pos = (
            seq_lens[row_entry]
            - q_lens[row_entry]
            + torch.arange(num_q_rows)
            - cu_q_lens[row_entry]
        )
        row_cold = cold[row_entry, row_pos // bs] & written
        if bool(row_cold.any()):
            row = int(torch.nonzero(row_cold)[0])
            raise InvalidArgument(f"q row {row} is to be written into a CPU-tier block")

    valid = (seq_lens[:, None] - block_start).clamp(0, bs)
    hot_lens = (valid * hot).sum(1)
    # Each row's hot blocks moved to its front, in order.
    hot_counts = hot.sum(1)
    hot_table = torch.zeros((batch, max(int(hot_counts.max()), 1)), dtype=torch.int64)
    hot_table[hot_entry, hot.cumsum(1)[hot_entry, hot_col] - 1] = hot_ids
    has_hot = hot_lens > 0
    hot_plan = None
    hot_rows = torch.zeros(0, dtype=torch.int64)
    if bool(has_hot.any()):
        entries = torch.nonzero(has_hot).flatten()
        row_entry = torch.repeat_interleave(torch.arange(batch), q_lens)
        hot_rows = torch.nonzero(has_hot[row_entry]).flatten()
        new_slots = None
        if plan.new_slots is not None:
            slots = as_int_tensor("new_slots", plan.new_slots, length=num_q_rows)[hot_rows]
            new_slots = tuple(slots.tolist())
        # Tuples all the way down: the worker's plan cache keeps it across layers.
        hot_plan = AttendPlan(
            block_tables=tuple(map(tuple, hot_table[entries].tolist())),
            seq_lens=tuple(hot_lens[entries].tolist()),
            q_lens=tuple(q_lens[entries].tolist()),
            new_slots=new_slots,
        )
    cold_ids, cold_index = torch.unique(cold_refs, sorted=True, return_inverse=True)
    return TieredSplit(
        hot_plan=hot_plan,
        hot_rows=hot_rows,
        cold_ids=cold_ids,
        cold_entry=cold_entry,
        cold_index=cold_index.flatten(),
        cold_valid=valid[cold_entry, cold_col],
        q_lens=q_lens,
        cu_q_lens=cu_q_lens,
    )


def _written_rows(plan: AttendPlan, num_q_rows: int, writes: bool) -> torch.Tensor | None:
    """Which q rows get their K/V written (None: none)."""
    if not writes:
        return None
    if plan.new_slots is None:
        return torch.ones(num_q_rows, dtype=torch.bool)
    return as_int_tensor("new_slots", plan.new_slots, length=num_q_rows) != -1


def _window_split(
    plan: AttendPlan,
    table: torch.Tensor,
    cold: torch.Tensor,
    seq_lens: torch.Tensor,
    q_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    bs: int,
    window: int,
) -> TieredSplit:
    """Sliding window: drop the blocks no query sees; every block left must be hot.

    The blocks left are a suffix of each entry, so positions shift uniformly and both the
    causal mask and the window are unchanged.
    """
    width = table.shape[1]
    first_visible = (seq_lens - q_lens - window + 1).clamp(min=0) // bs  # block index
    visible = torch.arange(width)[None, :] >= first_visible[:, None]
    if bool((cold & visible).any()):
        entry = int(torch.nonzero(cold & visible)[0, 0])
        raise InvalidArgument(
            f"entry {entry}: a CPU-tier block lies inside the sliding window; "
            "blocks a windowed query sees must be in the GPU tier"
        )
    index = (first_visible[:, None] + torch.arange(width)[None, :]).clamp(max=width - 1)
    suffix = table.gather(1, index)
    window_plan = AttendPlan(
        block_tables=suffix,
        seq_lens=seq_lens - first_visible * bs,
        q_lens=q_lens,
        new_slots=plan.new_slots,
    )
    empty = torch.zeros(0, dtype=torch.int64)
    return TieredSplit(None, empty, empty, empty, empty, empty, q_lens, cu_q_lens, window_plan)


def chunk_plans(split: TieredSplit, chunk_blocks: int, block_size: int) -> Iterator[ChunkPlan]:
    """Cut the cold references into chunks of at most ``chunk_blocks`` distinct blocks,
    each built when asked for (while the copies before it run)."""
    chunk_of = split.cold_index // chunk_blocks
    for c in range(-(-split.cold_ids.numel() // chunk_blocks)):
        mask = chunk_of == c
        entry = split.cold_entry[mask]
        slot = split.cold_index[mask] - c * chunk_blocks
        valid = split.cold_valid[mask]
        # Group by entry; within an entry the one partial block goes last (attention over
        # the chunk is unmasked, so the order of full blocks does not matter).
        key = entry * 2 + (valid < block_size).to(torch.int64)
        order = torch.argsort(key, stable=True)
        entry, slot, valid = entry[order], slot[order], valid[order]
        entries, counts = torch.unique_consecutive(entry, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        col = torch.arange(entry.numel()) - torch.repeat_interleave(starts, counts)
        group = torch.repeat_interleave(torch.arange(entries.numel()), counts)
        tables = torch.zeros((entries.numel(), int(counts.max())), dtype=torch.int32)
        tables[group, col] = slot.to(torch.int32)
        lens = torch.zeros(entries.numel(), dtype=torch.int64).index_add_(0, group, valid)
        # One decode row per q row of each entry (all its queries see all of the chunk).
        row_counts = split.q_lens[entries]
        row_group = torch.repeat_interleave(torch.arange(entries.numel()), row_counts)
        row_starts = torch.cumsum(row_counts, 0) - row_counts
        rows = (
            split.cu_q_lens[entries][row_group]
            + torch.arange(row_group.numel())
            - row_starts[row_group]
        )
        ids = split.cold_ids[c * chunk_blocks : (c + 1) * chunk_blocks]
        yield ChunkPlan(ids, rows, tables[row_group], lens[row_group].to(torch.int32))


@dataclass(slots=True)
class _Stage:
    """One chunk's copy: its CPU blocks and how to move them (built once per split)."""

    ids: torch.Tensor  # [n] host int64, ascending
    ids_dev: torch.Tensor  # the same on the worker's device (the gather kernel's pairs)
    blocks: frozenset[int]  # the same, for the pending-copy list
    runs: tuple[tuple[int, int, int], ...]  # (staging slot, first CPU block, count)


@dataclass(slots=True)
class _Chunk:
    """One chunk's attention, its tensors already on the worker's device."""

    rows: torch.Tensor | None  # [R] q rows; None = every q row, in order
    block_tables: torch.Tensor  # [R, width] int32 staging slots
    seq_lens: torch.Tensor  # [R] int32
    num_splits: int


@dataclass(slots=True)
class _Schedule:
    """A split's cold stream, built and uploaded once (one host-to-device copy) and kept
    with the split, so the layers of a step only queue kernels and copies."""

    stages: list[_Stage]
    chunks: list[_Chunk]
    hot_rows: torch.Tensor | None  # device; None = every q row, in order
    ready: Any  # CUDA event after the upload (None on the CPU)
    cold_blocks: frozenset[int]
    num_hot_blocks: int


class _Accumulator:
    """fp32 (out, lse) of the q rows, merged part by part (rows None = all rows)."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device) -> None:
        self.shape, self.device = shape, device
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, rows: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor) -> None:
        out = out.float()
        if rows is None and self.out is None:
            self.out, self.lse = out, lse
            return
        if self.out is None or self.lse is None:
            self.out = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
            self.lse = torch.full(self.shape[:2], float("-inf"), device=self.device)
        if rows is None:
            self.out, self.lse = kernels.merge_attn_states(self.out, self.lse, out, lse)
            return
        merged_out, merged_lse = kernels.merge_attn_states(self.out[rows], self.lse[rows], out, lse)
        self.out[rows] = merged_out
        self.lse[rows] = merged_lse


class TieredAttention:
    """The tiered attention path of one worker (see the module docstring).

    ``staging_bytes``: size of each of the two staging buffers; ``copy_mode``: "kernel"
    (the swap kernel gathers host blocks in one launch), "memcpy2d" (the copy engine, one
    2-D copy per run of consecutive CPU blocks; CUDA only) or "auto".

    Streams: the copy of chunk i waits only for the attention that last read its staging
    buffer (an event per buffer, recorded on the compute stream right after that decode
    kernel); the attention over chunk i waits only for chunk i's copy event. Nothing in the
    loop blocks the host or copies host memory on the compute stream: a small upload there
    would queue behind the staging copies on the copy engine and serialize the pipeline.
    """

    def __init__(
        self, worker: Worker, *, staging_bytes: int = DEFAULT_STAGING_BYTES, copy_mode: str = "auto"
    ) -> None:
        layout = worker.layout
        self._worker = worker
        self.block_bytes = layout.block_bytes // layout.num_layers  # one layer, K and V
        self.chunk_blocks = max(1, staging_bytes // self.block_bytes)
        self.copy_mode = copy_mode
        self._staging: list[torch.Tensor] = []
        # Per staging buffer: an event after the last kernel that reads it (CUDA only).
        self._free: list[Any] = [None, None]
        # The layers of one step attend with one plan object: it is split once.
        self._splits = _SplitCache()
        self._no_memcpy2d = False  # set when 2-D copies failed once ("auto" then gathers)
        self._counters: dict[str, float] = defaultdict(float)
        device = worker.device
        self._num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 4
        )

    @property
    def copy_mode(self) -> str:
        return self._copy_mode

    @copy_mode.setter
    def copy_mode(self, mode: str) -> None:
        if mode not in COPY_MODES:
            raise InvalidArgument(f"copy_mode must be one of {COPY_MODES}, got {mode!r}")
        self._copy_mode = mode

    def stats(self) -> dict[str, float]:
        """Calls, blocks and bytes read per tier (one layer's slice of a block each)."""
        return dict(self._counters)

    def attend(
        self,
        layer: int,
        plan: AttendPlan,
        q: torch.Tensor,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
        *,
        scale: float | None,
        sliding_window: int | None,
        return_lse: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Worker.attend for a plan with CPU-tier blocks (arguments already checked)."""
        w = self._worker
        num_rows = q.shape[0]
        key = (num_rows, k_new is not None, sliding_window, self.chunk_blocks)
        cached = self._splits.get(plan, key)
        if cached is None:
            split = split_plan(
                plan,
                block_size=w.layout.block_size,
                num_gpu_blocks=w.num_gpu_blocks,
                num_cpu_blocks=w.num_cpu_blocks,
                num_q_rows=num_rows,
                writes=k_new is not None,
                sliding_window=sliding_window,
            )
            sched = None if split.window_plan is not None else self._schedule(split, num_rows)
            self._splits.put(plan, key, (split, sched))
        else:
            split, sched = cached
        if split.window_plan is not None or sched is None:
            return w.attend(
                layer, split.window_plan, q, k_new, v_new,
                scale=scale, sliding_window=sliding_window, return_lse=return_lse,
            )  # fmt: skip
        self._count(split, sched)
        if not sched.stages and sched.hot_rows is None and split.hot_plan is not None:
            # Nothing cold: the hot plan is the whole plan.
            return w.attend(
                layer, split.hot_plan, q, k_new, v_new, scale=scale, return_lse=return_lse
            )
        stages, num_chunks = sched.stages, len(sched.stages)
        copy_stream = w._swap_stream
        compute_stream = w._compute_stream()
        if copy_stream is not None and num_chunks:
            if len(w._pending):  # swaps still filling these CPU blocks
                w._pending.wait_on_stream(Tier.CPU, sched.cold_blocks, copy_stream)
            copy_stream.wait_event(sched.ready)  # the chunk ids (gather kernel pairs)
        # The first two copies start before anything else is queued.
        if num_chunks:
            self._buffers(max(s.ids.numel() for s in stages[:2]), num_chunks)
        handles = [self._stage(layer, stages[c], c % 2) for c in range(min(2, num_chunks))]

        q_dev = w._to_device(q)
        acc = _Accumulator(tuple(q.shape), w.device)
        if split.hot_plan is not None:  # on the compute stream, under the first copy
            rows = sched.hot_rows
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])
            hot_out, hot_lse = w.attend(
                layer, split.hot_plan, pick(q_dev),
                None if k_new is None else pick(w._to_device(k_new)),
                None if v_new is None else pick(w._to_device(v_new)),
                scale=scale, return_lse=True,
            )  # fmt: skip
            acc.add(rows, hot_out, hot_lse)
        for c, chunk in enumerate(sched.chunks):
            b = c % 2
            staged = self._staging[b]
            event = handles[c].event
            if compute_stream is not None and event is not None:
                compute_stream.wait_event(event)
            with w._timer.region("tiered_cold_attention", compute_stream):
                out_c, lse_c = kernels.paged_decode(
                    q_dev if chunk.rows is None else q_dev[chunk.rows],
                    staged[:, 0], staged[:, 1], chunk.block_tables, chunk.seq_lens,
                    scale=scale, return_lse=True, num_splits=chunk.num_splits,
                    check_indices=False,
                )  # fmt: skip
                self._release(b, compute_stream)
                acc.add(chunk.rows, out_c, lse_c)
            if c + 2 < num_chunks:
                handles.append(self._stage(layer, stages[c + 2], b))
        assert acc.out is not None and acc.lse is not None
        out = acc.out.to(q.dtype).to(q.device)
        return (out, acc.lse.to(q.device)) if return_lse else out

    # ----------------------------------------------------------------- schedule
    def _schedule(self, split: TieredSplit, num_rows: int) -> _Schedule:
        """Every chunk's tables and copies, built on the host once and uploaded in one copy
        (before any staging copy is queued, so it does not wait behind them)."""
        w = self._worker
        bs, size = w.layout.block_size, self.chunk_blocks
        all_rows = torch.arange(num_rows)
        pieces: list[torch.Tensor] = []
        offset = 0

        def put(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
            nonlocal offset
            pieces.append(t.reshape(-1).to(torch.int64))
            offset += t.numel()
            return offset - t.numel(), tuple(t.shape)

        def every_row(rows: torch.Tensor) -> bool:
            return rows.numel() == num_rows and torch.equal(rows, all_rows)

        hot_rows = None
        if split.hot_plan is not None and not every_row(split.hot_rows):
            hot_rows = put(split.hot_rows)
        chunk_refs = []
        stage_refs = []
        for c, chunk in enumerate(chunk_plans(split, size, bs)):
            rows = None if every_row(chunk.rows) else put(chunk.rows)
            chunk_refs.append(
                (rows, put(chunk.block_tables), put(chunk.seq_lens), self._splits_for(chunk))
            )
            ids = split.cold_ids[c * size : (c + 1) * size]
            stage_refs.append((ids, put(ids)))
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        ready = None
        if w.device.type == "cuda":
            flat = flat.pin_memory().to(w.device, non_blocking=True)
            if w._swap_stream is not None:
                flat.record_stream(w._swap_stream)  # the gather kernel's pairs read it there
            ready = torch.cuda.Event()
            ready.record(w._compute_stream())
        flat32 = flat.to(torch.int32)

        def view(ref: tuple[int, tuple[int, ...]], src: torch.Tensor) -> torch.Tensor:
            start, shape = ref
            return src[start : start + math.prod(shape)].view(shape)

        chunks = [
            _Chunk(
                None if rows is None else view(rows, flat),
                view(tables, flat32),
                view(lens, flat32),
                splits,
            )
            for rows, tables, lens, splits in chunk_refs
        ]
        stages = [
            _Stage(ids, view(ref, flat), frozenset(ids.tolist()), _runs(ids))
            for ids, ref in stage_refs
        ]
        num_hot = 0
        if split.hot_plan is not None:
            lens = torch.as_tensor(split.hot_plan.seq_lens)
            num_hot = int(((lens + bs - 1) // bs).sum())
        return _Schedule(
            stages=stages,
            chunks=chunks,
            hot_rows=None if hot_rows is None else view(hot_rows, flat),
            ready=ready,
            cold_blocks=frozenset(split.cold_ids.tolist()),
            num_hot_blocks=num_hot,
        )

    def _splits_for(self, chunk: ChunkPlan) -> int:
        """Splits of one chunk's decode: its rows are few (a decode step's), so the
        (row, KV head) programs alone would leave most SMs idle; split each chunk's keys so
        about four programs per SM run, every split at least 256 tokens long."""
        rows, width = chunk.block_tables.shape
        tokens = max(width * self._worker.layout.block_size, 1)
        programs = max(rows * self._worker.layout.num_kv_heads, 1)
        return max(1, min(-(-4 * self._num_sms // programs), tokens // 256, 128))

    # ----------------------------------------------------------------- staging
    def _buffers(self, num_blocks: int, num_chunks: int) -> list[torch.Tensor]:
        """Two staging buffers of at least ``num_blocks`` layer-blocks (grown, never shrunk)."""
        w = self._worker
        count = min(2, num_chunks)
        if len(self._staging) < count or self._staging[0].shape[0] < num_blocks:
            size = max(num_blocks, self._staging[0].shape[0] if self._staging else 0)
            shape = (size, 2, w.layout.block_size, w.layout.num_kv_heads, w.layout.head_dim)
            compute = w._compute_stream()
            if w._swap_stream is not None and compute is not None:
                compute.wait_stream(w._swap_stream)  # the old buffers' copies are done
            self._staging = []  # the old buffers go back to the allocator first
            self._staging = [
                torch.empty(shape, dtype=w.gpu_pool.dtype, device=w.device) for _ in range(2)
            ]
            if compute is not None:  # the copies into them wait for their allocation
                for b in range(2):
                    self._release(b, compute)
        return self._staging

    def _release(self, b: int, stream: Any) -> None:
        """Mark staging buffer ``b`` free once ``stream``'s work so far is done."""
        if stream is None:
            return
        event = self._free[b]
        if event is None:
            event = self._free[b] = torch.cuda.Event()
        event.record(stream)  # a wait already queued keeps the state it saw

    def _stage(self, layer: int, stage: _Stage, b: int) -> Any:
        """Start copying this layer's slice of the stage's CPU blocks into buffer ``b``."""
        w = self._worker
        buffer = self._staging[b]
        num_layers = w.layout.num_layers
        n = stage.ids.numel()
        stream = w._swap_stream
        mode = self._mode_for(stage)
        if stream is not None and self._free[b] is not None:
            stream.wait_event(self._free[b])  # its last reader; outside the timed region
        with w._timer.region("tiered_stream", stream=stream):
            handle = None
            if mode == "memcpy2d":
                try:
                    handle = _memcpy2d(w.cpu_pool, buffer, stage.runs, layer, stream)
                except RuntimeError:
                    if self._copy_mode == "memcpy2d":
                        raise
                    logger.warning(
                        "2-D copies failed; staging with the gather kernel", exc_info=True
                    )
                    self._no_memcpy2d = True
                    mode = "kernel"
            if handle is None:
                layers = w.cpu_pool.view(w.num_cpu_blocks * num_layers, *buffer.shape[1:])
                on_stream = torch.cuda.stream(stream) if stream is not None else _no_context()
                with on_stream:  # pairs made and read on the copy stream
                    src = stage.ids_dev * num_layers + layer
                    pairs = torch.stack([src, torch.arange(n, device=src.device)], dim=1)
                    handle = kernels.swap_blocks(
                        layers, buffer[:n], pairs, stream=stream, check_indices=False
                    )
        w._pending.add(handle, (), stage.blocks)
        self._counters[f"chunks_{mode}"] += 1
        return handle

    def _mode_for(self, stage: _Stage) -> str:
        if self._worker.device.type != "cuda":
            return "kernel"  # host to host: one indexed copy
        mode = self._copy_mode
        if mode == "auto":
            if self._no_memcpy2d:
                return "kernel"
            runs = max(len(stage.runs), 1)
            n = stage.ids.numel()
            mode = "memcpy2d" if n >= _MIN_MEAN_RUN * runs and _cudart() else "kernel"
        return mode

    def _count(self, split: TieredSplit, sched: _Schedule) -> None:
        c = self._counters
        c["calls"] += 1
        num_cold = split.cold_ids.numel()
        c["hot_blocks"] += sched.num_hot_blocks
        c["hot_bytes"] += sched.num_hot_blocks * self.block_bytes
        c["cold_blocks"] += num_cold
        c["cold_bytes"] += num_cold * self.block_bytes


def _runs(ids: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """Runs of consecutive ids: (index of the first, its id, length)."""
    if not ids.numel():
        return ()
    breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*starts[1:], ids.numel()]
    firsts = ids[starts].tolist()
    return tuple((s, f, e - s) for s, f, e in zip(starts, firsts, ends, strict=True))


@contextlib.contextmanager
def _no_context() -> Iterator[None]:
    yield


class _SplitCache:
    """Splits (and chunk tables) of the last few frozen plan objects (see PlanCache)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._entries: dict[int, tuple[AttendPlan, tuple[Any, ...], Any]] = {}

    def get(self, plan: AttendPlan, key: tuple[Any, ...]) -> Any:
        entry = self._entries.get(id(plan))
        if entry is None or entry[0] is not plan or entry[1] != key:
            return None
        return entry[2]

    def put(self, plan: AttendPlan, key: tuple[Any, ...], value: Any) -> None:
        if not _is_frozen(plan):
            return
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        self._entries[id(plan)] = (plan, key, value)


# --------------------------------------------------------------------- copy engine path
@functools.cache
def _cudart() -> Any:
    """The CUDA runtime torch loaded (ctypes), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            lib.cudaMemcpy2DAsync.restype = ctypes.c_int
            lib.cudaMemcpy2DAsync.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
            ]  # fmt: skip
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            lib.cudaGetErrorString.argtypes = [ctypes.c_int]
            return lib
    except (OSError, AttributeError) as exc:
        logger.warning("no CUDA runtime for 2-D copies, using the gather kernel: %s", exc)
    return None


_HOST_TO_DEVICE = 1


def _memcpy2d(
    cpu_pool: torch.Tensor,
    buffer: torch.Tensor,
    runs: tuple[tuple[int, int, int], ...],
    layer: int,
    stream: Any,
) -> kernels.SwapHandle:
    """One strided copy-engine transfer per run of consecutive CPU blocks."""
    lib = _cudart()
    if lib is None:
        raise RuntimeError("memcpy2d copy mode needs the CUDA runtime library")
    num_layers = cpu_pool.shape[1]
    row = buffer[0].numel() * buffer.element_size()
    pitch = row * num_layers
    src0 = cpu_pool.data_ptr() + layer * row
    dst0 = buffer.data_ptr()
    for start, block, count in runs:
        err = lib.cudaMemcpy2DAsync(
            dst0 + start * row, row, src0 + block * pitch, pitch, row, count,
            _HOST_TO_DEVICE, stream.cuda_stream,
        )  # fmt: skip
        if err:
            raise RuntimeError(f"cudaMemcpy2DAsync failed: {lib.cudaGetErrorString(err).decode()}")
    event = torch.cuda.Event()
    event.record(stream)
    return kernels.SwapHandle(event=event, _keep_alive=(cpu_pool, buffer))
