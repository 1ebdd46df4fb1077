"""Sequence records for the workers' ledgers, and rebuilding a manager from them.

A rebuild trusts block placement (the workers hold the data) but not hashes: every
prefix hash is recomputed from the recorded tokens and tenant, and a record whose hashes
disagree (another layout, a corrupted ledger) is refused rather than cached wrongly.
Cached blocks nobody holds are not recorded, so after a rebuild they are free. New
sequence ids continue above any id issued before (see ``rebuild``).

Updates (``take_changes``): a record the worker already holds is changed by a
``RecordDelta`` from the marks kept on each ``SeqState`` (tokens and blocks that still
match); a record is sent whole when the worker holds none, the
sequence moved, it has a pin, or a shared block entered the prefix cache since
(``_ledger_epoch``: other holders' hashes changed without their marks). Folding the
deltas gives the record ``build_record`` would make at the same moment.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvservice.core.block_pool import BlockMeta
from kvservice.core.commands import PoolSizes
from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import BlockHash, SeqId, TenantId, Tier
from kvservice.core.pins import Pin
from kvservice.core.planner import WorkerState
from kvservice.core.prefix_cache import chain_hash, encode_tokens, register
from kvservice.core.records import BlockRecord, PinRecord, RecordDelta, SeqRecord
from kvservice.core.sequence import SeqState

if TYPE_CHECKING:
    from kvservice.core.layout import Layout
    from kvservice.core.manager import KVCacheManager


# Records are immutable values: one object per distinct (block, tier, hash), shared by
# every record that holds it. A decode step rebuilds the record of each sequence in the
# batch; reusing the block records makes that several times cheaper and leaves far less
# for the garbage collector.
_block_record = functools.lru_cache(maxsize=1 << 16, typed=True)(BlockRecord)


def _block_records(metas: list[BlockMeta]) -> tuple[BlockRecord, ...]:
    return tuple(_block_record(m.block_id, m.tier, m.block_hash) for m in metas)


def build_record(seq_id: int, seq: SeqState | None, pin: Pin | None) -> SeqRecord:
    """The record of a live sequence, or of a freed one its pin still holds."""
    pin_record = None
    if pin is not None:
        pin_record = PinRecord(
            _block_records(pin.blocks), pin.hard, pin.deadline, pin.tokens, pin.num_computed
        )
    if seq is None:
        assert pin is not None
        return SeqRecord(SeqId(seq_id), pin.tenant, (), (), 0, pin_record, live=False)
    return SeqRecord(
        seq.seq_id, seq.tenant, tuple(seq.tokens), _block_records(seq.blocks), seq.num_computed,
        pin_record, live=True,
    )


class LedgerChanges:
    """What one worker's ledger needs after some calls: whole records, deletes, and the
    delta entries (seq_id, num_tokens, new_tokens, num_blocks, new_blocks, computed)."""

    __slots__ = ("upserts", "deletes", "entries")

    def __init__(self) -> None:
        self.upserts: dict[int, SeqRecord] = {}
        self.deletes: list[int] = []
        self.entries: list[tuple[int, int, tuple[int, ...], int, tuple[BlockRecord, ...], int]] = []

    def delta(self) -> RecordDelta | None:
        if not self.entries:
            return None
        return RecordDelta(*map(tuple, zip(*self.entries, strict=True)))  # type: ignore[arg-type]


def take_changes(
    manager: KVCacheManager, *, deltas: bool = True
) -> dict[int, LedgerChanges]:
    """The ledger changes of every record marked changed, per worker, and the marks reset.

    A live, unpinned sequence whose record its worker holds (``SeqState.ledger_*``) gets
    a delta past what still matches; any other gets its whole record. ``deltas=False``: whole records only.
    """
    out: dict[int, LedgerChanges] = {}
    seqs, pins, epoch = manager._seqs, manager._pins, manager._ledger_epoch
    changes = LedgerChanges()
    changes_worker = -1
    for seq_id in sorted(manager._upserts):
        seq = seqs.get(seq_id)
        pin = pins.get(seq_id) if pins else None
        if seq is None:
            if pin is not None:
                _changes_of(out, pin.worker_id).upserts[seq_id] = build_record(seq_id, None, pin)
            continue
        worker_id = seq.worker_id
        if worker_id != changes_worker:
            changes, changes_worker = _changes_of(out, worker_id), worker_id
        tokens, blocks = seq.tokens, seq.blocks
        num_tokens, num_blocks = len(tokens), len(blocks)
        if seq.ledger_worker == worker_id and pin is None and seq.ledger_epoch == epoch and deltas:
            # Sent even when the marks are at the ends: a cut to them changed the record.
            kept_tokens, kept_blocks = seq.ledger_tokens, seq.ledger_blocks
            changes.entries.append((
                seq_id, kept_tokens, tuple(tokens[kept_tokens:]), kept_blocks,
                _block_records(blocks[kept_blocks:]) if kept_blocks != num_blocks else (),
                seq.num_computed,
            ))  # fmt: skip
        else:
            changes.upserts[seq_id] = build_record(seq_id, seq, pin)
            # A pinned record is always sent whole (its pin's blocks are not tracked).
            seq.ledger_worker = worker_id if pin is None else -1
            seq.ledger_epoch = epoch
        seq.ledger_tokens = num_tokens
        seq.ledger_blocks = num_blocks
    for seq_id, deleted_from in sorted(manager._deletes.items()):
        if seq_id not in seqs and seq_id not in pins:
            _changes_of(out, deleted_from).deletes.append(seq_id)
    manager._progress.difference_update(manager._upserts)
    manager._progress.difference_update(manager._deletes)
    manager._upserts.clear()
    manager._deletes.clear()
    return out


def _changes_of(out: dict[int, LedgerChanges], worker_id: int) -> LedgerChanges:
    changes = out.get(worker_id)
    if changes is None:
        changes = out[worker_id] = LedgerChanges()
    return changes


def rebuild(
    layout: Layout,
    workers: Mapping[int, PoolSizes],
    records: Mapping[int, Mapping[int, SeqRecord]],
    options: dict[str, Any],
) -> KVCacheManager:
    from kvservice.core.manager import KVCacheManager

    manager = KVCacheManager(layout, workers, **options)
    seen: set[int] = set()
    for worker_id, by_seq in records.items():
        if worker_id not in manager._workers:
            raise InvalidArgument(f"records for unknown worker {worker_id}")
        ws = manager._workers[worker_id]
        for seq_id, rec in sorted(by_seq.items()):
            if seq_id in seen or seq_id != rec.seq_id or seq_id < 0:
                raise InvalidArgument(f"bad or repeated sequence id {seq_id} in the ledgers")
            seen.add(seq_id)
            tenant = manager._tenant(rec.tenant)
            if rec.live:
                _restore_seq(manager, ws, rec, tenant)
            if rec.pin is not None:
                _restore_pin(manager, ws, seq_id, rec.pin, tenant)
    # Freed sequences leave no record, so the ledgers cannot say which ids were issued.
    # Numbering from the clock (ms << 12) stays above every id an earlier coordinator
    # could have handed out, unless it issued over 4,096 ids per millisecond of its life.
    manager._next_seq_id = max(max(seen, default=-1) + 1, int(manager._clock() * 1000) << 12)
    manager._upserts.clear()
    manager.check_invariants()
    return manager


def _metas(ws: WorkerState, blocks: Sequence[BlockRecord], what: str) -> list[BlockMeta]:
    metas = []
    for block in blocks:
        pool = ws.pool(Tier(block.tier))
        if not 0 <= block.block_id < pool.num_blocks:
            raise InvalidArgument(f"{what}: block {block.block_id} outside the pool")
        metas.append(pool.metas[block.block_id])
    if len({id(m) for m in metas}) != len(metas):
        raise InvalidArgument(f"{what} lists a block twice")
    return metas


def _index_chain(
    manager: KVCacheManager,
    ws: WorkerState,
    tenant: TenantId,
    tokens: list[int],
    metas: list[BlockMeta],
    recorded: Sequence[BlockHash | None],
    num_full: int,
    what: str,
) -> list[BlockHash]:
    """Recompute the chain hashes; re-index blocks whose record says they were cached."""
    bs = manager.block_size
    hashes: list[BlockHash] = []
    parent_hash = manager._salt(tenant)
    for i in range(num_full):
        block_bytes = encode_tokens(tokens[i * bs : (i + 1) * bs])
        block_hash = chain_hash(parent_hash, block_bytes)
        if recorded[i] is not None and recorded[i] != block_hash:
            raise InvalidArgument(f"{what}: block {i} hash does not match its tokens")
        hashes.append(block_hash)
        parent = metas[i - 1] if i else None
        if recorded[i] is not None and (parent is None or parent.block_hash == parent_hash):
            register(ws.pool(metas[i].tier), metas[i], block_hash, parent, block_bytes, tenant)
        parent_hash = block_hash
    return hashes


def _restore_seq(manager: KVCacheManager, ws: WorkerState, rec: SeqRecord, tenant: TenantId) -> None:
    what = f"sequence {rec.seq_id}"
    tokens, _ = manager._tokens(rec.tokens)
    if len(rec.blocks) != manager.layout.num_blocks_for(len(tokens)):
        raise InvalidArgument(f"{what}: {len(rec.blocks)} blocks for {len(tokens)} tokens")
    if not 0 <= rec.num_computed_tokens <= len(tokens):
        raise InvalidArgument(f"{what}: bad num_computed_tokens")
    seq = SeqState(rec.seq_id, tenant, ws.worker_id, tokens)
    for meta in _metas(ws, rec.blocks, what):
        ws.pool(meta.tier).incref(meta)
        seq.add_block(meta)
    seq.num_computed = rec.num_computed_tokens
    recorded = [b.block_hash for b in rec.blocks]
    num_full = seq.num_computed // manager.block_size
    seq.hashes = _index_chain(manager, ws, tenant, tokens, seq.blocks, recorded, num_full, what)
    manager._seqs[seq.seq_id] = ws.seqs[seq.seq_id] = seq
    ws.eviction.touch(seq.seq_id)


def _restore_pin(
    manager: KVCacheManager, ws: WorkerState, seq_id: int, rec: PinRecord, tenant: TenantId
) -> None:
    what = f"pin of sequence {seq_id}"
    tokens, _ = manager._tokens(rec.tokens)
    metas = _metas(ws, rec.blocks, what)
    if len(metas) != manager.layout.num_blocks_for(len(tokens)):
        raise InvalidArgument(f"{what}: {len(metas)} blocks for {len(tokens)} tokens")
    for meta in metas:
        ws.pool(meta.tier).incref(meta)
    num_full = min(rec.num_computed_tokens, len(tokens)) // manager.block_size
    recorded = [b.block_hash for b in rec.blocks]
    _index_chain(manager, ws, tenant, tokens, metas, recorded, num_full, what)
    pin = Pin(ws.worker_id, metas, rec.hard, rec.deadline, tenant, tuple(tokens), rec.num_computed_tokens)
    manager._pins.add(seq_id, pin)
