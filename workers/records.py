"""What a worker reports about itself: its identity and its ledger.

The epoch is drawn fresh at every construction, so a worker that restarted (and lost its
pools) is told apart from the one a coordinator knew, and its ledger starts empty.
The ledger holds the coordinator's ``SeqRecord``s as sent; the worker only checks that
each names its own key and blocks inside its pools, so a rebuild never points outside.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from kvservice.workers.checks import check_index, check_tier

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier
from kvservice.core.layout import Layout
from kvservice.core.records import BlockRecord, SeqRecord


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


class LedgerBook:
    """The records by sequence id, updated only by fully checked batches."""

    def __init__(self) -> None:
        self._records: dict[int, SeqRecord] = {}
        # Computed counts sent since their record: folded in when the ledger is read.
        self._progress: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def update(self, upserts: object, deletes: object, num_blocks: tuple[int, int]) -> None:
        """``num_blocks``: pool sizes indexed by Tier."""
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
        progress = self._progress
        for key in removed:
            self._records.pop(key, None)
            progress.pop(key, None)
        if progress:
            for key in checked:
                progress.pop(key, None)
        self._records.update(checked)

    def update_progress(self, progress: object) -> None:
        """``{seq_id: num_computed_tokens}`` for records already held: the count a whole
        record would carry, without re-sending it. Unknown ids are ignored (the record was
        dropped meanwhile); a count past the record's tokens is an error."""
        if not isinstance(progress, Mapping):
            raise InvalidArgument(f"progress must be a dict, got {type(progress).__name__}")
        records = self._records
        checked: dict[int, int] = {}
        for key, count in progress.items():
            record = records.get(key) if type(key) is int else None
            if record is None:
                check_index("progress key", key, 2**63)
                continue
            if type(count) is not int or not 0 <= count <= len(record.tokens):
                raise InvalidArgument(
                    f"progress of seq {key}: {count!r} is not a count within its "
                    f"{len(record.tokens)} tokens"
                )
            checked[key] = count
        self._progress.update(checked)

    def _fold_progress(self) -> None:
        records = self._records
        for key, count in self._progress.items():
            record = records[key]
            if record.num_computed_tokens != count:
                records[key] = replace(record, num_computed_tokens=count)
        self._progress.clear()

    def snapshot(self, epoch: int) -> Ledger:
        if self._progress:
            self._fold_progress()
        return Ledger(epoch=epoch, records=dict(self._records))

    def blocks_held(self) -> tuple[set[int], set[int]]:
        """Distinct block ids the records hold, indexed by Tier (pins included)."""
        held: tuple[set[int], set[int]] = (set(), set())
        for record in self._records.values():
            for block in _blocks_of(record):
                held[block.tier].add(block.block_id)
        return held


def _check_record(key: object, record: object, num_blocks: tuple[int, int]) -> SeqRecord:
    if not isinstance(record, SeqRecord):
        raise InvalidArgument(f"ledger record {key!r} must be a SeqRecord, got {record!r}")
    if record.seq_id != key:
        raise InvalidArgument(f"ledger record under key {key!r} names seq_id {record.seq_id}")
    blocks = _blocks_of(record)
    if _blocks_fit(blocks, num_blocks):
        return record
    for block in blocks:  # one is off: find it and say which
        tier: Tier = check_tier(block.tier)
        check_index(f"seq {key} {tier.name} block id", block.block_id, num_blocks[tier])
    return record


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
