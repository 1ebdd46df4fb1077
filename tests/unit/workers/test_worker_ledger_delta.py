"""Record deltas on a worker's ledger: folding them gives the whole record, and a bad
delta is refused with nothing applied."""

from __future__ import annotations

import pytest
from worker_helpers import make_worker

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import BlockHash, BlockId, SeqId, TenantId, Tier
from kvservice.core.records import BlockRecord, PinRecord, RecordDelta, SeqRecord


def block(b: int, tier: Tier = Tier.GPU, hashed: bool = False) -> BlockRecord:
    return BlockRecord(BlockId(b), tier, BlockHash(b * 7) if hashed else None)


def record(seq_id: int, tokens: tuple[int, ...], blocks: tuple[BlockRecord, ...], computed: int = 0) -> SeqRecord:
    return SeqRecord(SeqId(seq_id), TenantId("t"), tokens, blocks, computed)


def delta(*entries: tuple[int, int, tuple[int, ...], int, tuple[BlockRecord, ...], int]) -> RecordDelta:
    return RecordDelta(*map(tuple, zip(*entries, strict=True)))  # type: ignore[arg-type]


def test_deltas_fold_into_the_whole_record() -> None:
    worker = make_worker()
    worker.update_ledger({1: record(1, (5, 6), (block(0),)), 2: record(2, (9,), (block(3),))}, [])
    # append a token to each; seq 1 also gets a new block and a higher computed count
    worker.update_ledger({}, [], delta((1, 2, (7, 8, 9, 10, 11), 1, (block(1),), 2), (2, 1, (4,), 1, (), 0)))
    # seq 1: copy on write of its first block (hashed), tail cut; seq 2 untouched
    worker.update_ledger({}, [], delta((1, 3, (), 0, (block(2, hashed=True),), 3)))
    records = worker.ledger().records
    assert records[1] == record(1, (5, 6, 7), (block(2, hashed=True),), 3)
    assert records[2] == record(2, (9, 4), (block(3),))
    # a delta after a read, then progress, then a whole record replacing both
    worker.update_ledger({}, [], delta((2, 2, (1,), 0, (block(0, Tier.CPU),), 1)))  # swapped out
    assert worker.ledger().records[2] == record(2, (9, 4, 1), (block(0, Tier.CPU),), 1)
    worker.update_progress({2: 3})
    assert worker.ledger().records[2].num_computed_tokens == 3
    worker.update_ledger({}, [], delta((2, 3, (), 1, (), 2)))  # a later delta wins over progress
    assert worker.ledger().records[2].num_computed_tokens == 2
    whole = record(2, (1,), (block(4),))
    worker.update_ledger({2: whole}, [1])
    assert worker.ledger().records == {2: whole}
    assert worker.stats()["tiers"]["gpu"]["blocks_in_ledger"] == 1


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("not a delta", "RecordDelta"),
        (delta((9, 0, (1,), 0, (), 0)), "no live, unpinned record"),
        (delta((1, 3, (1,), 0, (), 0)), "keeps 3 of 2 tokens"),
        (delta((1, 2, (1,), 2, (), 0)), "2 of 1 blocks"),
        (delta((1, 2, (1,), 1, (), 4)), "computed 4"),
        (delta((1, 2, (1,), 1, (block(999),), 0)), "outside"),
        (delta((1, 2, [1], 1, (), 0)), "tuples"),
        (delta((1, 2, (1,), 1, (), 0), (1, 2, (1,), 1, (), 0)), "twice"),
        (delta((3, 0, (), 0, (), 0)), "no live, unpinned record"),  # pinned
        (RecordDelta((1,), (), (), (), (), ()), "differ in length"),
    ],
)
def test_a_bad_delta_changes_nothing(bad: object, match: str) -> None:
    worker = make_worker()
    pinned = SeqRecord(SeqId(3), TenantId("t"), (1,), (block(5),), 0, PinRecord((block(5),)))
    before = {1: record(1, (5, 6), (block(0),)), 2: record(2, (9,), (block(3),)), 3: pinned}
    worker.update_ledger(before, [])
    ok = delta((2, 1, (4,), 1, (), 1))
    with pytest.raises(InvalidArgument, match=match):
        # one good entry in the same call is not applied either
        worker.update_ledger({}, [], bad if not isinstance(bad, RecordDelta) else _join(ok, bad))
    assert worker.ledger().records == before


def test_a_delta_may_not_touch_a_record_upserted_or_deleted_with_it() -> None:
    worker = make_worker()
    worker.update_ledger({1: record(1, (5,), (block(0),))}, [])
    with pytest.raises(InvalidArgument, match="upserted or deleted"):
        worker.update_ledger({}, [1], delta((1, 1, (2,), 1, (), 0)))
    assert set(worker.ledger().records) == {1}


def _join(a: RecordDelta, b: RecordDelta) -> RecordDelta:
    return RecordDelta(*(x + y for x, y in zip(_columns(a), _columns(b), strict=True)))


def _columns(d: RecordDelta) -> tuple[tuple, ...]:  # type: ignore[type-arg]
    return (d.seq_ids, d.num_tokens, d.new_tokens, d.num_blocks, d.new_blocks, d.num_computed_tokens)
