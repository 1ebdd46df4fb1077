"""What a worker reports about itself: its identity and its ledger.

The epoch is drawn fresh at every construction, so a worker that restarted (and lost its
pools) is told apart from the one a coordinator knew, and its ledger starts empty.
The ledger holds the coordinator's ``SeqRecord``s as sent, with the ``RecordDelta``s sent
since folded in; the worker only checks that each names its own key and blocks inside its
pools (and that a delta changes a record it holds, within its length), so a rebuild never
points outside.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain

from kvservice.workers.checks import check_index, check_tier

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier
from kvservice.core.layout import Layout
from kvservice.core.records import BlockRecord, RecordDelta, SeqRecord


def new_epoch() -> int:
    """A random non-zero 63-bit int: fits a signed int64 on the wire."""
    return secrets.randbits(63) | 1


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: int
    epoch: int
    device: str
    layout: Layout
    num_gpu_blocks: int
    num_cpu_blocks: int


@dataclass(frozen=True, slots=True)
class Ledger:
    """The coordinator's records of the sequences on this worker, as last sent to it."""

    epoch: int
    records: dict[int, SeqRecord]


def _blocks_of(record: SeqRecord) -> tuple[BlockRecord, ...]:
    """The blocks a record holds: its own and those its pin keeps."""
    return (*record.blocks, *(record.pin.blocks if record.pin else ()))


class _Folded:
    """A held record that deltas changed: its tokens and blocks as lists, which the next
    delta extends in place (rebuilding tuples per token would cost what deltas save)."""

    __slots__ = ("tokens", "blocks", "num_computed")

    def __init__(self, record: SeqRecord) -> None:
        self.tokens = list(record.tokens)
        self.blocks = list(record.blocks)
        self.num_computed = record.num_computed_tokens


class LedgerBook:
    """The records by sequence id, updated only by fully checked batches."""

    def __init__(self) -> None:
        self._records: dict[int, SeqRecord] = {}
        # Records that deltas changed since they were last whole: folded back into
        # ``_records`` when the ledger is read.
        self._folded: dict[int, _Folded] = {}
        # Computed counts sent since their record: folded in when the ledger is read.
        self._progress: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def update(
        self,
        upserts: object,
        deletes: object,
        num_blocks: tuple[int, int],
        delta: object = None,
    ) -> None:
        """``num_blocks``: pool sizes indexed by Tier. Deletes, then upserts, then the
        delta (changes to records held before this call) are applied; all are checked
        first, so a bad batch changes nothing."""
        if not isinstance(upserts, Mapping):
            raise InvalidArgument(f"upserts must be a dict, got {type(upserts).__name__}")
        checked = {
            check_index("upserts key", key, 2**63): _check_record(key, record, num_blocks)
            for key, record in upserts.items()
        }
        if isinstance(deletes, (str, bytes)) or not isinstance(deletes, Sequence):
            raise InvalidArgument(f"deletes must be a list, got {type(deletes).__name__}")
        removed = {check_index("deletes entry", key, 2**63) for key in deletes}
        if removed.intersection(checked):
            raise InvalidArgument("a sequence is both upserted and deleted")
        if delta is not None:
            self._check_delta(delta, num_blocks, removed.union(checked))
        progress, folded = self._progress, self._folded
        for key in removed:
            self._records.pop(key, None)
            progress.pop(key, None)
            folded.pop(key, None)
        if progress or folded:
            for key in checked:
                progress.pop(key, None)
                folded.pop(key, None)
        self._records.update(checked)
        if delta is not None:
            self._fold_delta(delta)

    def _length(self, key: int) -> tuple[int, int]:
        """(tokens, blocks) of the held record ``key`` as it stands."""
        held = self._folded.get(key)
        if held is not None:
            return len(held.tokens), len(held.blocks)
        record = self._records[key]
        return len(record.tokens), len(record.blocks)

    def _check_delta(self, delta: object, num_blocks: tuple[int, int], touched: set[int]) -> None:
        """Each entry changes a live, unpinned record held before this call, within its
        length, with new blocks inside the pools. Types are checked over whole columns
        (one entry per sequence of a decode step), the rest entry by entry."""
        if not isinstance(delta, RecordDelta):
            raise InvalidArgument(f"delta must be a RecordDelta, got {type(delta).__name__}")
        ids = delta.seq_ids
        counts = (delta.num_tokens, delta.num_blocks, delta.num_computed_tokens)
        news = (delta.new_tokens, delta.new_blocks)
        n = len(ids)
        if any(len(column) != n for column in (*counts, *news)):
            raise InvalidArgument(f"delta columns differ in length from its {n} seq_ids")
        if n == 0:
            return
        if set(map(type, chain(ids, *counts))) != {int}:
            raise InvalidArgument("delta seq ids and counts must be ints")
        if set(map(type, chain(*news))) != {tuple}:
            raise InvalidArgument("delta new tokens and blocks must be tuples")
        if len(set(ids)) != n or not touched.isdisjoint(ids):
            raise InvalidArgument("a delta names a sequence twice, or one upserted or deleted")
        records, folded = self._records, self._folded
        for key, keep_tokens, tokens, keep_blocks, computed in zip(
            ids, delta.num_tokens, delta.new_tokens, delta.num_blocks,
            delta.num_computed_tokens, strict=True,
        ):  # fmt: skip
            held = folded.get(key)
            if held is not None:  # made from a live, unpinned record
                num_tokens, num_held_blocks = len(held.tokens), len(held.blocks)
            else:
                record = records.get(key)
                if record is None or not record.live or record.pin is not None:
                    raise InvalidArgument(f"delta for seq {key}: no live, unpinned record held")
                num_tokens, num_held_blocks = len(record.tokens), len(record.blocks)
            if not (
                0 <= keep_tokens <= num_tokens
                and 0 <= keep_blocks <= num_held_blocks
                and 0 <= computed <= keep_tokens + len(tokens)
            ):
                raise InvalidArgument(
                    f"delta for seq {key}: keeps {keep_tokens} of {num_tokens} tokens and "
                    f"{keep_blocks} of {num_held_blocks} blocks, {len(tokens)} new tokens, "
                    f"computed {computed}"
                )
        new_blocks = tuple(chain.from_iterable(delta.new_blocks))
        if new_blocks:
            if set(map(type, new_blocks)) != {BlockRecord}:
                raise InvalidArgument("delta blocks must be BlockRecords")
            _check_blocks("delta", new_blocks, num_blocks)

    def _fold_delta(self, delta: RecordDelta) -> None:
        records, folded, progress = self._records, self._folded, self._progress
        for key, keep_tokens, tokens, keep_blocks, blocks, computed in zip(
            delta.seq_ids, delta.num_tokens, delta.new_tokens, delta.num_blocks,
            delta.new_blocks, delta.num_computed_tokens, strict=True,
        ):  # fmt: skip
            held = folded.get(key)
            if held is None:
                held = folded[key] = _Folded(records[key])
            if keep_tokens != len(held.tokens):
                del held.tokens[keep_tokens:]
            held.tokens += tokens
            if blocks or keep_blocks != len(held.blocks):
                del held.blocks[keep_blocks:]
                held.blocks += blocks
            held.num_computed = computed
        if progress:
            for key in delta.seq_ids:
                progress.pop(key, None)

    def update_progress(self, progress: object) -> None:
        """``{seq_id: num_computed_tokens}`` for records already held: the count a whole
        record would carry, without re-sending it. Unknown ids are ignored (the record was
        dropped meanwhile); a count past the record's tokens is an error."""
        if not isinstance(progress, Mapping):
            raise InvalidArgument(f"progress must be a dict, got {type(progress).__name__}")
        records = self._records
        checked: dict[int, int] = {}
        for key, count in progress.items():
            if type(key) is not int or key not in records:
                check_index("progress key", key, 2**63)
                continue
            num_tokens = self._length(key)[0]
            if type(count) is not int or not 0 <= count <= num_tokens:
                raise InvalidArgument(
                    f"progress of seq {key}: {count!r} is not a count within its "
                    f"{num_tokens} tokens"
                )
            checked[key] = count
        self._progress.update(checked)

    def _fold(self) -> None:
        records = self._records
        for key, held in self._folded.items():
            records[key] = replace(
                records[key], tokens=tuple(held.tokens), blocks=tuple(held.blocks),
                num_computed_tokens=held.num_computed,
            )  # fmt: skip
        self._folded.clear()
        for key, count in self._progress.items():
            record = records[key]
            if record.num_computed_tokens != count:
                records[key] = replace(record, num_computed_tokens=count)
        self._progress.clear()

    def snapshot(self, epoch: int) -> Ledger:
        if self._progress or self._folded:
            self._fold()
        return Ledger(epoch=epoch, records=dict(self._records))

    def blocks_held(self) -> tuple[set[int], set[int]]:
        """Distinct block ids the records hold, indexed by Tier (pins included)."""
        held: tuple[set[int], set[int]] = (set(), set())
        folded = self._folded
        for key, record in self._records.items():
            grown = folded.get(key)
            blocks = _blocks_of(record) if grown is None else grown.blocks
            for block in blocks:
                held[block.tier].add(block.block_id)
        return held


def _check_record(key: object, record: object, num_blocks: tuple[int, int]) -> SeqRecord:
    if not isinstance(record, SeqRecord):
        raise InvalidArgument(f"ledger record {key!r} must be a SeqRecord, got {record!r}")
    if record.seq_id != key:
        raise InvalidArgument(f"ledger record under key {key!r} names seq_id {record.seq_id}")
    _check_blocks(f"seq {key}", _blocks_of(record), num_blocks)
    return record


def _check_blocks(what: str, blocks: tuple[BlockRecord, ...], num_blocks: tuple[int, int]) -> None:
    if _blocks_fit(blocks, num_blocks):
        return
    for block in blocks:  # one is off: find it and say which
        tier: Tier = check_tier(block.tier)
        check_index(f"{what} {tier.name} block id", block.block_id, num_blocks[tier])


def _blocks_fit(blocks: tuple[BlockRecord, ...], num_blocks: tuple[int, int]) -> bool:
    """Every block a plain int id inside its tier's pool: the common case, checked in one
    pass (a decode step re-sends the record of every sequence in the batch)."""
    by_tier: tuple[list[int], list[int]] = ([], [])
    for block in blocks:
        tier = block.tier
        if type(tier) not in (Tier, int) or tier not in (0, 1):
            return False
        by_tier[tier].append(block.block_id)
    for ids, limit in zip(by_tier, num_blocks, strict=True):
        # The ids are typed int, but a record may come from anywhere: check their type.
        if ids and (set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) >= limit):
            return False
    return True
