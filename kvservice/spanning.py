"""Long sequences as runs of segments: hot/cold paging within a worker and across workers.

A service sequence longer than ``segment_tokens`` is held as *segments*: core sequences of
at most ``segment_tokens`` tokens each, covering consecutive position ranges. The first
segment is the service sequence itself (same id, same tenant, so the prefix cache keeps
working for the start of the prompt); every later segment is a core sequence of a private
tenant (``segment_tenant``), which never enters the prefix cache (its blocks hold K/V at
positions other than its own index). Segments are full except the last (the *tail*),
and only the tail grows; ``segment_tokens`` is a multiple of the block size.

Why segments: the core moves whole core sequences between tiers and places each on one
worker, least recently used first. Attention makes the *hot* segments GPU-resident and
touches them (the first segment, holding attention sinks and system prompt, and those
overlapping the recent window and the new tokens); the others are read where they lie,
untouched, so they age into the cold victims the core swaps to CPU when room is needed
(high/low watermarks), and come back on a Prefetch hint. A new segment goes to the tail's
worker while that worker can hold it (the core swaps its cold victims to make room) and
to the roomiest other worker once it cannot: the split across workers follows growth.
Attention over the segments is planned in ``kvservice.span_attention``.

Every method runs under the coordinator's table lock and returns the core's commands;
sequences of one segment go straight to the manager, as before.

Ledger: the segments are ordinary core sequences, so their records reach their workers'
ledgers as usual; the list of a sequence's segments is one more record in the ledger of
its first segment's worker, under key ``SPAN_RECORD_BASE + seq_id`` (tokens = the segment
size, the tokens computed in every layer, then the segments' core ids in order; no blocks),
so ``restore`` can rebuild it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvservice.core.commands import Command, CreateResult, OutOfMemory
from kvservice.core.errors import KVServiceError
from kvservice.core.ids import SeqId, TenantId, Tier
from kvservice.core.manager import KVCacheManager
from kvservice.core.records import SeqRecord

logger = logging.getLogger(__name__)

# Tenants of non-first segments: "<tenant>" + this mark. Clients cannot name them (tenant
# names are checked at the service edge) and nothing registers them in the prefix cache.
SEGMENT_MARK = "\x00segment"
# Default segment size: this fraction of the smallest GPU tier, so that the hot segments
# (first, window, tail) of a few long sequences fit in the GPU tier together; at least
# MIN_SEGMENT_BLOCKS, so that tiny tiers keep whole sequences (and their prefix caching).
DEFAULT_SEGMENT_FRACTION = 1 / 8
MIN_SEGMENT_BLOCKS = 16
# Ledger keys of the segment lists: above every sequence id the core hands out.
SPAN_RECORD_BASE = 1 << 62
SPAN_RECORD_TENANT = SEGMENT_MARK + ":segments"


def segment_tenant(tenant: str) -> str:
    return tenant + SEGMENT_MARK


def is_segment_tenant(tenant: str) -> bool:
    return tenant.endswith(SEGMENT_MARK)


def split_span_records(
    records: dict[int, dict[int, SeqRecord]],
) -> tuple[dict[int, dict[int, SeqRecord]], dict[int, SeqRecord]]:
    """Ledger records -> (the core's records per worker, segment lists by service id)."""
    core: dict[int, dict[int, SeqRecord]] = {}
    spans: dict[int, SeqRecord] = {}
    for worker_id, by_seq in records.items():
        core[worker_id] = {}
        for key, record in by_seq.items():
            if key >= SPAN_RECORD_BASE and record.tenant == SPAN_RECORD_TENANT:
                spans[key - SPAN_RECORD_BASE] = record
            else:
                core[worker_id][key] = record
    return core, spans


def default_segment_tokens(num_gpu_blocks: Iterable[int], block_size: int) -> int:
    smallest = min(num_gpu_blocks)
    return block_size * max(MIN_SEGMENT_BLOCKS, int(smallest * DEFAULT_SEGMENT_FRACTION))


@dataclass(slots=True)
class Segment:
    core_id: int
    worker_id: int
    start: int  # position of its first token
    length: int  # tokens it holds

    @property
    def end(self) -> int:
        return self.start + self.length


class SpanTable:
    """The segments of every service sequence longer than one segment."""

    def __init__(
        self, manager: KVCacheManager, segment_tokens: int, window_tokens: int | None = None
    ) -> None:
        bs = manager.block_size
        if segment_tokens < bs or segment_tokens % bs:
            raise ValueError(f"segment_tokens must be a positive multiple of {bs}")
        self.manager = manager
        self.segment_tokens = segment_tokens
        self.window_tokens = segment_tokens if window_tokens is None else window_tokens
        self._spans: dict[int, list[Segment]] = {}
        self._owner: dict[int, int] = {}  # core id of a non-first segment -> service id
        self._dirty: dict[int, int] = {}  # service id -> its first worker: ledger to update
        self._computed: dict[int, int] = {}  # service id -> tokens computed in every layer

    # ------------------------------------------------------------------ queries
    def is_span(self, seq_id: int) -> bool:
        return seq_id in self._spans

    def any_span(self, seq_ids: Iterable[int]) -> bool:
        spans = self._spans
        return bool(spans) and any(s in spans for s in seq_ids)

    def segments(self, seq_id: int, worker_id: int, length: int) -> list[Segment]:
        """The sequence's segments (one for a plain sequence on ``worker_id``)."""
        segs = self._spans.get(seq_id)
        return segs if segs is not None else [Segment(seq_id, worker_id, 0, length)]

    def core_ids(self, seq_ids: Iterable[int]) -> list[int]:
        """Every core sequence behind the service sequences: first, tail, then older ones."""
        out: list[int] = []
        for sid in seq_ids:
            segs = self._spans.get(sid)
            if segs is None:
                out.append(sid)
            else:
                out += [segs[0].core_id, *(s.core_id for s in reversed(segs[1:]))]
        return out

    def first_length(self, seq_id: int, length: int) -> int:
        """Tokens of the first segment (the part the prefix cache may learn)."""
        segs = self._spans.get(seq_id)
        return length if segs is None else segs[0].length

    def blocks(self, seq_id: int) -> tuple[int, list[int]]:
        """(number of blocks, tier of each) over all segments."""
        tiers: list[int] = []
        for core_id in (s.core_id for s in self._spans[seq_id]):
            tiers += [int(t) for t in self.manager.sequence(core_id).tiers]
        return len(tiers), tiers

    def num_spans(self) -> int:
        return len(self._spans)

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes of the multi-segment sequences' blocks per tier (hot = GPU, cold = CPU)."""
        block_bytes = self.manager.layout.block_bytes
        counts = {"hot": 0, "cold": 0}
        for segs in self._spans.values():
            for seg in segs:
                for tier in self.manager.sequence(seg.core_id).tiers:
                    counts["cold" if tier is Tier.CPU else "hot"] += 1
        return {k: v * block_bytes for k, v in counts.items()}

    # ------------------------------------------------------------------ lifecycle
    def create(
        self, tenant: str, tokens: Sequence[int]
    ) -> tuple[CreateResult | OutOfMemory, list[Command]]:
        """Create a sequence, as segments if it is longer than one; returns the result and
        every command to run (also when it is OutOfMemory: earlier steps may have swapped)."""
        size = self.segment_tokens
        if len(tokens) > size and not self._can_place(len(tokens) - size, None, size):
            return OutOfMemory(f"no room for {len(tokens)} tokens on the workers"), []
        result = self.manager.create(tenant, tokens[:size])
        if isinstance(result, OutOfMemory):
            return result, []
        if len(tokens) <= size:
            return result, list(result.commands)
        first = Segment(result.seq_id, result.worker_id, 0, min(size, len(tokens)))
        self._spans[result.seq_id] = [first]
        commands = list(result.commands)
        grown = self._grow(result.seq_id, tenant, tokens[size:], commands)
        if grown is not None:
            commands += self.free(result.seq_id)
            return grown, commands
        return CreateResult(result.seq_id, result.worker_id, result.num_cached_tokens, []), commands

    def append(
        self, seq_id: int, tenant: str, worker_id: int, length: int, tokens: Sequence[int]
    ) -> tuple[OutOfMemory | None, list[Command]]:
        """Append to the tail, opening new segments past ``segment_tokens``; all or nothing."""
        segs = self._spans.get(seq_id)
        tail_length = length if segs is None else segs[-1].length
        room = self.segment_tokens - tail_length
        # A sequence already longer than one segment (made under a larger segment size)
        # stays whole: a segment must end on a block boundary.
        if room >= len(tokens) or (segs is None and room < 0):
            tail = seq_id if segs is None else segs[-1].core_id
            result = self.manager.append(tail, tokens)
            if isinstance(result, OutOfMemory):
                return result, []
            if segs is not None:
                segs[-1].length += len(tokens)
            return None, list(result.commands)
        tail_worker = worker_id if segs is None else segs[-1].worker_id
        if not self._can_place(len(tokens) - room, tail_worker, room):
            return OutOfMemory(f"no room to grow sequence {seq_id} on the workers"), []
        if segs is None:
            segs = self._spans[seq_id] = [Segment(seq_id, worker_id, 0, length)]
        commands: list[Command] = []
        if room > 0:
            result = self.manager.append(segs[-1].core_id, tokens[:room])
            if isinstance(result, OutOfMemory):
                self._drop_if_single(seq_id)
                return result, []
            commands += result.commands
            segs[-1].length += room
        failed = self._grow(seq_id, tenant, tokens[room:], commands)
        if failed is not None:
            commands += self.truncate(seq_id, length)
            return failed, commands
        return None, commands

    def _grow(
        self, seq_id: int, tenant: str, tokens: Sequence[int], commands: list[Command]
    ) -> OutOfMemory | None:
        """Open segments for ``tokens`` after a full tail; None, or OutOfMemory (the
        segments opened so far stay: the caller rolls back)."""
        segs = self._spans[seq_id]
        size = self.segment_tokens
        for offset in range(0, len(tokens), size):
            chunk = tokens[offset : offset + size]
            result = self._create_segment(tenant, chunk, segs[-1].worker_id)
            if isinstance(result, OutOfMemory):
                return result
            commands += result.commands
            segs.append(Segment(result.seq_id, result.worker_id, segs[-1].end, len(chunk)))
            self._owner[result.seq_id] = seq_id
            self._changed(seq_id, segs[0].worker_id)
        return None

    def _room(self) -> dict[int, int]:
        """Blocks each worker could still give (free or cached, either tier)."""
        return {
            w: t[Tier.GPU].free + t[Tier.GPU].cached + t[Tier.CPU].free + t[Tier.CPU].cached
            for w, t in self.manager.usage().items()
        }

    def _can_place(self, num_tokens: int, prefer: int | None, first_tokens: int) -> bool:
        """Whether new segments for ``num_tokens`` tokens fit, placed as ``_create_segment``
        would place them, after ``first_tokens`` more on ``prefer`` (or the roomiest
        worker): checked before anything changes, so a refusal swaps nothing."""
        blocks_for = self.manager.layout.num_blocks_for
        room = self._room()
        if not room:
            return False
        if prefer is None:
            prefer = max(room, key=lambda w: room[w])
        room[prefer] -= blocks_for(first_tokens)
        reserve = blocks_for(self.segment_tokens)
        for offset in range(0, num_tokens, self.segment_tokens):
            need = blocks_for(min(self.segment_tokens, num_tokens - offset)) + reserve
            others = sorted((w for w in room if w != prefer), key=lambda w: -room[w])
            chosen = next((w for w in [prefer, *others] if room[w] >= need), None)
            if chosen is None:
                return False
            room[chosen] -= need - reserve
            prefer = chosen
        return True

    def _create_segment(
        self, tenant: str, tokens: Sequence[int], prefer: int
    ) -> CreateResult | OutOfMemory:
        """On ``prefer`` (the tail's worker) if it can hold it, else the roomiest other.

        A worker can hold it if, beside it, one more segment's worth of blocks stays free
        or cached: without that room no cold segment there could ever be swapped back in.
        """
        manager = self.manager
        room = self._room()
        need = manager.layout.num_blocks_for(len(tokens) + self.segment_tokens)
        others = sorted((w for w in room if w != prefer), key=lambda w: -room[w])
        result: CreateResult | OutOfMemory = OutOfMemory("no worker has room for a segment")
        for worker_id in [prefer, *others] if prefer in room else others:
            if room[worker_id] < need:
                continue
            result = manager.create(segment_tenant(tenant), tokens, worker_id=worker_id)
            if not isinstance(result, OutOfMemory):
                assert result.num_cached_tokens == 0, "a segment tenant hit the prefix cache"
                return result
        return result

    def fork(self, seq_id: int, n: int) -> list[int]:
        children = [int(c) for c in self.manager.fork(seq_id, n)]
        segs = self._spans.get(seq_id)
        if segs is None:
            return children
        later = [[int(c) for c in self.manager.fork(s.core_id, n)] for s in segs[1:]]
        for i, child in enumerate(children):
            child_segs = [Segment(child, segs[0].worker_id, 0, segs[0].length)]
            for seg, forks in zip(segs[1:], later, strict=True):
                child_segs.append(Segment(forks[i], seg.worker_id, seg.start, seg.length))
                self._owner[forks[i]] = child
            self._spans[child] = child_segs
            self._computed[child] = self._computed.get(seq_id, 0)
            self._changed(child, segs[0].worker_id)
        return children

    def truncate(self, seq_id: int, length: int) -> list[Command]:
        segs = self._spans.get(seq_id)
        if segs is None:
            return self.manager.truncate(seq_id, length)
        commands: list[Command] = []
        while len(segs) > 1 and segs[-1].start >= length:
            dropped = segs.pop()
            self._changed(seq_id, segs[0].worker_id)
            del self._owner[dropped.core_id]
            commands += self.manager.free(dropped.core_id)
        tail = segs[-1]
        commands += self.manager.truncate(tail.core_id, length - tail.start)
        tail.length = length - tail.start
        self._drop_if_single(seq_id)
        return commands

    def free(self, seq_id: int) -> list[Command]:
        segs = self._spans.pop(seq_id, None)
        if segs is None:
            return self.manager.free(seq_id)
        self._changed(seq_id, segs[0].worker_id)
        commands: list[Command] = []
        for seg in reversed(segs):
            self._owner.pop(seg.core_id, None)
            commands += self.manager.free(seg.core_id)
        return commands

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """K/V is written below ``num_tokens``: the first segment's blocks may be cached."""
        segs = self._spans.get(seq_id)
        if segs is None:
            self.manager.mark_computed(seq_id, num_tokens)
            return
        self.manager.mark_computed(seq_id, min(num_tokens, segs[0].length))
        self._computed[seq_id] = num_tokens
        self._changed(seq_id, segs[0].worker_id)

    def lose(self, core_ids: Iterable[int]) -> set[int]:
        """Core sequences lost with a worker -> the service sequences lost with them.

        The surviving segments of a lost sequence are freed at once (their blocks are
        useless without the rest); the service ids stay known so callers get DATA_LOSS.
        """
        lost: set[int] = set()
        gone = set(core_ids)
        for core_id in gone:
            lost.add(self._owner.get(core_id, core_id))
        for seq_id in lost:
            segs = self._spans.pop(seq_id, None)
            if segs is not None:
                self._changed(seq_id, segs[0].worker_id)
            for seg in segs or ():
                self._owner.pop(seg.core_id, None)
                if seg.core_id not in gone:
                    self.manager.free(seg.core_id)  # FreeBlocks only: nothing to send
        return lost

    def moved(self, core_ids: Iterable[int], worker_id: int) -> dict[int, int]:
        """Core sequences that migrated to ``worker_id``: their segments follow. Returns
        {service id: previous worker} for each sequence whose first segment moved (its
        segment list's ledger record now belongs on ``worker_id``)."""
        first_moved: dict[int, int] = {}
        for core_id in core_ids:
            seq_id = self._owner.get(core_id, core_id)
            for i, seg in enumerate(self._spans.get(seq_id, ())):
                if seg.core_id == core_id and seg.worker_id != worker_id:
                    if i == 0:
                        first_moved[seq_id] = seg.worker_id
                        self._changed(seq_id, worker_id)
                    seg.worker_id = worker_id
        return first_moved

    def _drop_if_single(self, seq_id: int) -> None:
        segs = self._spans.get(seq_id)
        if segs is not None and len(segs) == 1:
            del self._spans[seq_id]
            self._changed(seq_id, segs[0].worker_id)

    def _changed(self, seq_id: int, first_worker: int) -> None:
        self._dirty[seq_id] = first_worker
        if seq_id not in self._spans:
            self._computed.pop(seq_id, None)

    # ------------------------------------------------------------------ ledger
    def take_ledger_updates(self) -> dict[int, tuple[dict[int, SeqRecord], list[int]]]:
        """(upserts, deletes) of segment lists per worker, changed since the last call."""
        out: dict[int, tuple[dict[int, SeqRecord], list[int]]] = {}
        for seq_id, worker_id in sorted(self._dirty.items()):
            upserts, deletes = out.setdefault(worker_id, ({}, []))
            key = SPAN_RECORD_BASE + seq_id
            segs = self._spans.get(seq_id)
            if segs is None:
                deletes.append(key)
            else:
                computed = min(self._computed.get(seq_id, 0), segs[-1].end)
                tokens = (self.segment_tokens, computed, *(s.core_id for s in segs))
                record = SeqRecord(SeqId(key), TenantId(SPAN_RECORD_TENANT), tokens, (), live=False)
                upserts[key] = record
        self._dirty.clear()
        return out

    def restore(self, records: dict[int, SeqRecord]) -> tuple[dict[int, tuple[int, int]], set[int]]:
        """Rebuild segment lists from their ledger records (the manager already holds the
        segments). Returns each restored sequence's (length, computed tokens), and the
        sequences that cannot be restored (a segment's worker is gone): their surviving
        segments are freed, and they are to answer DATA_LOSS."""
        restored: dict[int, tuple[int, int]] = {}
        lost: set[int] = set()
        for seq_id, record in sorted(records.items()):
            size, computed, *core_ids = record.tokens
            if not self._spans and size != self.segment_tokens:
                logger.warning(
                    "segment size %d from the ledgers replaces %d", size, self.segment_tokens
                )
                self.segment_tokens = self.window_tokens = size
            views = {}
            for core_id in core_ids:
                try:
                    views[core_id] = self.manager.sequence(core_id)
                except KVServiceError:
                    pass
            if size != self.segment_tokens or len(views) < len(core_ids):
                lost.add(seq_id)
                for core_id in views:
                    self.manager.free(core_id)  # FreeBlocks only: nothing to send
                continue
            segs, start = [], 0
            for core_id in core_ids:
                segs.append(
                    Segment(core_id, views[core_id].worker_id, start, views[core_id].num_tokens)
                )
                start += views[core_id].num_tokens
                if core_id != seq_id:
                    self._owner[core_id] = seq_id
            self._spans[seq_id] = segs
            self._computed[seq_id] = computed
            restored[seq_id] = (start, min(computed, start))
        return restored, lost

    def check_invariants(self, lengths: dict[int, int]) -> None:
        """Segments cover [0, length) in order; all but the tail are full (AssertionError)."""
        for seq_id, segs in self._spans.items():
            assert len(segs) > 1 and segs[0].core_id == seq_id, (seq_id, segs)
            position = 0
            for i, seg in enumerate(segs):
                view = self.manager.sequence(seg.core_id)
                assert seg.start == position and view.num_tokens == seg.length, (seq_id, seg)
                assert view.worker_id == seg.worker_id, (seq_id, seg, view.worker_id)
                assert i == len(segs) - 1 or seg.length == self.segment_tokens, (seq_id, seg)
                assert i == 0 or self._owner[seg.core_id] == seq_id, (seq_id, seg)
                position = seg.end
            if seq_id in lengths:
                assert position == lengths[seq_id], (seq_id, position, lengths[seq_id])
