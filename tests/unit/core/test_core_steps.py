"""Per-step calls, tier policy, placement and the ledger round trip, with exact ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core_helpers import create

from kvservice.core.commands import (
    AttentionPlan,
    CopyBlocks,
    CreateResult,
    DecodePlan,
    FreeBlocks,
    PoolSizes,
    SwapIn,
    SwapOut,
    WritePlan,
)
from kvservice.core.ids import Tier
from kvservice.core.manager import KVCacheManager

Make = Callable[..., KVCacheManager]
GPU, CPU = Tier.GPU, Tier.CPU



def test_prepare_decode_gives_slots_and_tables(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    a = create(m, [1, 1, 1, 1])  # block 0, full
    b = create(m, [2] * 5)  # blocks 1 2
    plan = m.prepare_decode([a, b], [7, 8])
    assert plan == DecodePlan(0, [[0, 3], [1, 2]], [5, 6], [12, 9], [])
    assert m.sequence(a).tokens == [1, 1, 1, 1, 7]
    (child,) = m.fork(b, 1)
    plan = m.prepare_decode([child, b], [5, 6])  # both write block 2: the first copies
    assert plan == DecodePlan(0, [[1, 4], [1, 2]], [7, 7], [18, 10], [CopyBlocks(0, ((2, 4),))])
    m.check_invariants()


def test_prepare_write_copies_shared_blocks_in_range(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    parent = create(m, list(range(8)))
    (child,) = m.fork(parent, 1)
    plan = m.prepare_write(child, 2, 8)
    assert plan == WritePlan(0, list(range(10, 16)), [CopyBlocks(0, ((0, 2), (1, 3)))])
    assert m.prepare_write(parent, 0, 8) == WritePlan(0, list(range(8)), [])
    assert m.prepare_write(parent, 3, 3) == WritePlan(0, [], [])
    m.check_invariants()


def test_truncate_keeps_full_cached_blocks_and_drops_the_rewritten_one(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    a = create(m, list(range(9)))
    m.mark_computed(a, 9)  # blocks 0 and 1 cached
    assert m.truncate(a, 6) == [FreeBlocks(0, GPU, (2,))]
    assert m.sequence(a).num_computed_tokens == 6
    # Block 1 is partial now and will be overwritten: it left the prefix cache.
    assert m.lookup_prefix(None, [*range(8), 50]) == {0: 4}
    assert m.truncate(a, 0) == [FreeBlocks(0, GPU, (1,))]  # block 0 stays cached
    assert m.usage()[0][GPU].cached == 1
    m.check_invariants()


def test_watermarks_evict_cached_blocks_first_then_swap(make_manager: Make) -> None:
    m = make_manager(gpu=10, cpu=8, high_watermark=0.8, low_watermark=0.5)
    a = create(m, list(range(12)))
    m.mark_computed(a, 12)
    m.free(a)  # three cached blocks
    b, c = create(m, [1] * 12), create(m, [2] * 12)
    # used 6 + cached 3 > 8: cached blocks go (down to 5), nothing needs swapping.
    assert m.usage()[0][GPU].cached == 0 and m.usage()[0][GPU].used == 6
    result = m.create(None, [3] * 12)
    assert isinstance(result, CreateResult)
    # used 9 > 8: the coldest sequences swap out until used <= 5.
    assert result.commands == [SwapOut(0, ((3, 0), (4, 1), (5, 2), (6, 3), (7, 4), (8, 5)))]
    assert m.sequence(b).tiers == [CPU] * 3 and m.sequence(c).tiers == [CPU] * 3
    assert m.usage()[0][GPU].used == 3
    m.check_invariants()


def test_offload_and_prefetch_move_whole_sequences(make_manager: Make) -> None:
    m = make_manager(gpu=8, cpu=4)
    a = create(m, list(range(8)))
    (child,) = m.fork(a, 1)
    assert m.offload([a]) == []  # every block is shared with the child
    assert m.offload([a, child]) == [SwapOut(0, ((0, 0), (1, 1)))]
    assert m.sequence(child).tiers == [CPU, CPU]
    assert m.prefetch([child]) == [SwapIn(0, ((0, 0), (1, 1)))]  # copies: a still holds them
    assert m.sequence(child).block_ids == [0, 1] and m.sequence(a).tiers == [CPU, CPU]
    plan = m.prepare_attention([a])
    assert plan == AttentionPlan(0, [[2, 3]], [8], [SwapIn(0, ((0, 2), (1, 3)))])
    m.check_invariants()


def test_placement_follows_the_cached_prefix_then_free_room(make_manager: Make) -> None:
    m = make_manager(gpu=8, num_workers=2)
    first = m.create(None, list(range(9)))
    assert isinstance(first, CreateResult) and first.worker_id == 0  # a tie: lowest id
    m.mark_computed(first.seq_id, 9)
    again = m.create(None, [*range(8), 99])
    assert isinstance(again, CreateResult) and (again.worker_id, again.num_cached_tokens) == (0, 8)
    other = m.create(None, [5, 5])
    assert isinstance(other, CreateResult) and other.worker_id == 1  # more free blocks
    spread = make_manager(gpu=8, num_workers=2, placement="most_free")
    first = spread.create(None, list(range(9)))
    assert isinstance(first, CreateResult)
    spread.mark_computed(first.seq_id, 9)
    again = spread.create(None, [*range(8), 99])
    assert isinstance(again, CreateResult) and (again.worker_id, again.num_cached_tokens) == (1, 0)


def test_a_new_manager_rebuilds_from_the_ledgers(make_manager: Make) -> None:
    now = [50.0]
    m = make_manager(gpu=8, cpu=4, num_workers=2, clock=lambda: now[0])
    ledgers: dict[int, dict[int, Any]] = {0: {}, 1: {}}

    def sync() -> None:
        for w, (upserts, deletes) in m.take_ledger_updates().items():
            ledgers[w].update(upserts)
            for sid in deletes:
                del ledgers[w][sid]

    system = create(m, list(range(9)), "t", worker_id=0)
    m.mark_computed(system, 9)
    m.pin(system)
    sync()
    m.free(system)  # its pin keeps blocks 0 1 2 and the record
    user = create(m, [*range(8), 7, 7], "t", worker_id=0)
    (child,) = m.fork(user, 1)
    m.append(child, [1])
    m.offload([user])
    soft = create(m, [4] * 6, worker_id=1)
    m.pin(soft, hard=False, ttl_s=5.0)
    gone = create(m, [3], worker_id=1)
    sync()
    m.free(gone)
    sync()
    assert sorted(ledgers[0]) == [system, user, child] and sorted(ledgers[1]) == [soft]
    sizes = {0: PoolSizes(8, 4), 1: PoolSizes(8, 4)}
    rebuilt = KVCacheManager.from_ledgers(
        m.layout, sizes, ledgers, clock=lambda: now[0], high_watermark=1.0, low_watermark=1.0
    )
    for sid in (user, child, soft):
        assert rebuilt.sequence(sid) == m.sequence(sid)
    assert [rebuilt.usage()[w][GPU].used for w in (0, 1)] == [m.usage()[w][GPU].used for w in (0, 1)]
    assert rebuilt.lookup_prefix("t", [*range(8), 5]) == {0: 8}  # the pinned prompt
    assert create(rebuilt, [1]) == 50_000 << 12  # never a freed id: numbered from the clock
    now[0] += 6.0
    rebuilt.expire_pins()
    assert rebuilt.sequence(soft).pinned is None
    rebuilt.check_invariants()


def test_computed_counts_go_out_as_progress_not_whole_records(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    a = create(m, list(range(6)))
    b = create(m, [9] * 5)
    m.take_ledger_updates()
    m.mark_computed(a, 3)  # no new full block: the record itself is unchanged
    m.mark_computed(b, 4)  # block 0 enters the prefix cache: the record changes
    updates = m.take_ledger_updates()
    assert set(updates[0][0]) == {b} and updates[0][0][b].num_computed_tokens == 4
    assert m.take_progress_updates() == {0: {a: 3}}
    assert m.take_progress_updates() == {}
    m.mark_computed(a, 5)
    m.append(a, [6])  # a whole record carries the count: no progress for it
    assert m.take_ledger_updates()[0][0][a].num_computed_tokens == 5
    assert m.take_progress_updates() == {}
    m.mark_computed(a, 6)
    m.free(a)
    m.take_ledger_updates()
    assert m.take_progress_updates() == {}


def test_a_write_into_private_blocks_leaves_the_record_unchanged(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    a = create(m, list(range(6)))
    m.mark_computed(a, 6)
    m.take_ledger_updates()
    m.append(a, [6])
    m.take_ledger_updates()
    assert m.prepare_write(a, 6, 7).commands == []  # every layer of a decode step
    assert m.take_ledger_updates() == {}
    (child,) = m.fork(a, 1)
    m.take_ledger_updates()
    plan = m.prepare_write(child, 6, 7)  # the shared last block is copied: a new record
    assert plan.commands == [CopyBlocks(0, ((1, 2),))]
    assert set(m.take_ledger_updates()[0][0]) == {child}
    assert m.prepare_write(child, 5, 7).commands == []  # a rewrite: computed drops to 5
    assert m.take_ledger_updates()[0][0][child].num_computed_tokens == 5
