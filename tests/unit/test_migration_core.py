"""Core migration planning: sequences move with their sharing, pins and cache entries;
prefixes copy between workers; placement weighs prefix against load; a refused move
changes nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from kvservice.core.commands import CreateResult, FreeBlocks, OutOfMemory, PoolSizes
from kvservice.core.errors import DataLoss, InvalidArgument, NotFound
from kvservice.core.ids import Tier
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager
from kvservice.core.migration import (
    Migration,
    Placement,
    TransferBlocks,
    copy_prefix,
    place,
    plan_migration,
    plan_rebalance,
    sharing_groups,
)
from kvservice.core.policies import PrefixAffinityLoad, WorkerCandidate

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
GPU, CPU = Tier.GPU, Tier.CPU


def _core_helpers() -> Any:
    """The core tests' full-state snapshot (their conftest is not importable by name)."""
    spec = importlib.util.spec_from_file_location(
        "core_test_helpers", Path(__file__).parent / "core" / "core_helpers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


snapshot = _core_helpers().snapshot


def manager(gpu: int = 16, cpu: int = 4, num_workers: int = 2, **options: Any) -> KVCacheManager:
    options.setdefault("high_watermark", 1.0)
    options.setdefault("low_watermark", 1.0)
    return KVCacheManager(LAYOUT, {w: PoolSizes(gpu, cpu) for w in range(num_workers)}, **options)


def create(m: KVCacheManager, tokens: list[int], worker_id: int | None = 0, **kw: Any) -> int:
    result = m.create(kw.pop("tenant", None), tokens, worker_id=worker_id)
    assert isinstance(result, CreateResult), result
    return result.seq_id


def migrate(m: KVCacheManager, seq_ids: list[int], dst: int) -> Migration:
    result = plan_migration(m, seq_ids, dst)
    assert isinstance(result, Migration), result
    m.check_invariants()
    return result


def test_a_sequence_moves_with_its_blocks_and_the_source_frees_them() -> None:
    m = manager()
    sid = create(m, list(range(10)))  # blocks 0, 1, 2 on worker 0
    m.mark_computed(sid, 10)  # blocks 0 and 1 enter worker 0's prefix cache
    m.take_ledger_updates()
    result = migrate(m, [sid], 1)
    assert result.transfer == TransferBlocks(0, 1, ((GPU, 0, GPU, 0), (GPU, 1, GPU, 1), (GPU, 2, GPU, 2)))
    assert result.seq_ids == (sid,) and result.pinned_ids == () and result.num_shared_blocks == 0
    assert result.commands == [FreeBlocks(0, GPU, (2,))]  # 0 and 1 stay cached on worker 0
    view = m.sequence(sid)
    assert view.worker_id == 1 and view.block_ids == [0, 1, 2] and view.num_computed_tokens == 10
    assert m.usage()[0][GPU].used == 0 and m.usage()[0][GPU].cached == 2
    assert m.lookup_prefix(None, list(range(10))) == {0: 8, 1: 8}  # both know the prefix now
    updates = m.take_ledger_updates()
    assert list(updates) == [1] and sid in updates[1][0]


def test_forks_moved_together_share_on_the_destination() -> None:
    m = manager()
    parent = create(m, list(range(8)))
    children = m.fork(parent, 2)
    assert m.append(children[0], [1]) is not None  # one child grows: a block of its own
    result = migrate(m, [parent, *children], 1)
    assert len(result.transfer.blocks) == 3  # two shared blocks sent once, and the new one
    tables = [m.sequence(s).block_ids for s in (parent, *children)]
    assert tables == [[0, 1], [0, 1, 2], [0, 1]]
    assert m.usage()[1][GPU].used == 3 and m.usage()[0][GPU].used == 0


def test_a_block_shared_with_a_sequence_that_stays_is_copied() -> None:
    m = manager()
    parent = create(m, list(range(8)))
    (child,) = m.fork(parent, 1)
    result = migrate(m, [child], 1)
    assert result.transfer.blocks == ((GPU, 0, GPU, 0), (GPU, 1, GPU, 1))
    assert result.commands == []  # the parent still holds both
    assert m.sequence(parent).block_ids == [0, 1] and m.sequence(parent).worker_id == 0
    assert m.usage()[0][GPU].used == 2 and m.usage()[1][GPU].used == 2


def test_blocks_the_destination_caches_are_shared_not_sent() -> None:
    m = manager()
    prompt = list(range(13))  # three full blocks and one token
    on_1 = create(m, prompt, 1)
    m.mark_computed(on_1, 13)
    mover = create(m, [*prompt[:8], 99, 98, 97, 96, 95])  # shares two blocks' worth
    m.mark_computed(mover, 13)
    result = migrate(m, [mover], 1)
    assert result.num_shared_blocks == 2
    assert [(d, b) for _, _, d, b in result.transfer.blocks] == [(GPU, 4), (GPU, 5)]
    assert m.sequence(mover).block_ids == [0, 1, 4, 5]
    assert m.sequence(on_1).block_ids == [0, 1, 2, 3]


def test_cpu_blocks_keep_their_tier_and_overflow_to_the_other() -> None:
    m = manager(gpu=8, cpu=8)
    sid = create(m, list(range(12)))
    assert m.offload([sid])  # all three blocks to worker 0's CPU tier
    filler = create(m, list(range(100, 120)), 1)  # 5 of worker 1's 8 GPU blocks
    assert m.sequence(filler).worker_id == 1
    result = migrate(m, [sid], 1)
    assert [(s, d) for s, _, d, _ in result.transfer.blocks] == [(CPU, CPU)] * 3
    m2 = manager(gpu=8, cpu=3)
    sid = create(m2, list(range(12)))
    m2.offload([sid])
    other = create(m2, list(range(100, 108)), 1)
    m2.offload([other])  # worker 1 has one CPU block of room left
    result = migrate(m2, [sid], 1)
    assert [d for _, _, d, _ in result.transfer.blocks] == [CPU, GPU, GPU]


def test_pins_move_with_their_sequences_and_alone() -> None:
    m = manager()
    kept = create(m, list(range(8)))
    m.mark_computed(kept, 8)
    m.pin(kept)
    freed = create(m, list(range(50, 58)))
    m.mark_computed(freed, 8)
    m.pin(freed)
    m.free(freed)  # only its pin holds its blocks now
    assert sorted(map(sorted, sharing_groups(m, 0))) == [[kept], [freed]]
    result = migrate(m, [kept, freed], 1)
    assert result.seq_ids == (kept,) and result.pinned_ids == (kept, freed)
    assert m.sequence(kept).pinned == "hard" and m.usage()[0][GPU].used == 0
    assert m.usage()[1][GPU].used == 4
    m.unpin(freed)  # cached on both: worker 0 keeps its copies as cached blocks
    assert m.lookup_prefix(None, [*range(50, 58), 1]) == {0: 8, 1: 8}


def test_a_refused_move_changes_nothing() -> None:
    m = manager(gpu=4, cpu=0)
    sid = create(m, list(range(12)))  # 3 blocks
    create(m, list(range(100, 108)), 1)  # 2 of worker 1's 4
    before = snapshot(m)
    result = plan_migration(m, [sid], 1)
    assert isinstance(result, OutOfMemory) and result.worker_id == 1
    assert snapshot(m) == before


def test_bad_moves_raise() -> None:
    m = manager(num_workers=3)
    a = create(m, [1, 2, 3], 0)
    b = create(m, [4, 5, 6], 1)
    with pytest.raises(InvalidArgument, match="per worker"):
        plan_migration(m, [a, b], 2)
    with pytest.raises(InvalidArgument, match="already"):
        plan_migration(m, [a], 0)
    with pytest.raises(NotFound):
        plan_migration(m, [77], 1)
    with pytest.raises(NotFound):
        plan_migration(m, [a], 9)
    m.remove_worker(1)
    with pytest.raises(DataLoss):
        plan_migration(m, [b], 0)


def test_copy_prefix_makes_the_destination_hit() -> None:
    m = manager()
    prompt = list(range(21))  # five full blocks
    src = create(m, prompt, 0)
    m.mark_computed(src, 21)
    transfer = copy_prefix(m, None, prompt, 0, 1)
    assert transfer is not None and [(b, d) for _, b, _, d in transfer.blocks] == [
        (0, 0), (1, 1), (2, 2), (3, 3), (4, 4)
    ]  # fmt: skip
    m.check_invariants()
    assert m.usage()[1][GPU].cached == 5
    result = m.create(None, prompt, worker_id=1)
    assert isinstance(result, CreateResult) and result.num_cached_tokens == 20
    assert copy_prefix(m, None, prompt, 0, 1) is None  # nothing missing any more
    assert copy_prefix(m, "other", prompt, 0, 1) is None  # another tenant's cache is empty
    m.check_invariants()


def test_copy_prefix_sends_only_the_missing_tail_and_needs_room() -> None:
    m = manager(gpu=8)
    prompt = list(range(17))
    src = create(m, prompt, 0)
    m.mark_computed(src, 17)
    dst = create(m, prompt[:8] + [1000], 1)
    m.mark_computed(dst, 9)
    transfer = copy_prefix(m, None, prompt, 0, 1)
    assert transfer is not None and [b for _, b, _, _ in transfer.blocks] == [2, 3]
    m.check_invariants()
    small = manager(gpu=4)
    sid = create(small, list(range(9)), 0)
    small.mark_computed(sid, 9)
    create(small, list(range(100, 116)), 1)  # worker 1 is full
    before = snapshot(small)
    assert copy_prefix(small, None, list(range(9)), 0, 1) is None
    assert snapshot(small) == before


def test_affinity_load_policy_stops_piling_onto_one_worker() -> None:
    policy = PrefixAffinityLoad(slack=0.1, min_slack_blocks=0)
    cand = [WorkerCandidate(0, 64, 50, 100), WorkerCandidate(1, 0, 100, 100)]
    assert policy.choose(cand) == 1  # worker 0 is 50 % busier: its prefix does not win
    cand = [WorkerCandidate(0, 64, 95, 100), WorkerCandidate(1, 0, 100, 100)]
    assert policy.choose(cand) == 0  # within the slack: affinity wins
    cand = [WorkerCandidate(0, 64, 50), WorkerCandidate(1, 0, 100)]
    assert policy.choose(cand) == 0  # no pool sizes: plain prefix affinity
    cand = [WorkerCandidate(0, 64, 50, 100), WorkerCandidate(1, 0, 100, 100)]
    assert PrefixAffinityLoad(slack=0.1, min_slack_blocks=64).choose(cand) == 0  # 50 blocks: noise


def test_place_copies_a_long_prefix_to_the_less_busy_worker() -> None:
    m = manager(gpu=1000, placement="affinity_load")
    system = list(range(40))  # ten full blocks
    first = create(m, [*system, 1], 0)
    m.mark_computed(first, 41)
    assert place(m, None, [*system, 2], min_copy_blocks=4) == Placement(0)  # within the slack
    for i in range(2):
        create(m, list(range(1000 + 400 * i, 1400 + 400 * i)), 0)  # worker 0 gets busy
    assert place(m, None, [*system, 2], min_copy_blocks=4) == Placement(1, 0, 10)
    assert place(m, None, [*system, 2], min_copy_blocks=11) == Placement(1)
    assert copy_prefix(m, None, [*system, 2], 0, 1) is not None
    result = m.create(None, [*system, 2])  # after the copy: the same choice, and a hit
    assert isinstance(result, CreateResult)
    assert (result.worker_id, result.num_cached_tokens) == (1, 40)
    assert place(manager(num_workers=1), None, [1, 2]) is None
    plain = manager(gpu=200)  # prefix affinity alone never needs a copy
    sid = create(plain, [*system, 1], 0)
    plain.mark_computed(sid, 41)
    create(plain, list(range(1000, 1100)), 0)
    assert place(plain, None, [*system, 2]) == Placement(0)


def test_rebalance_moves_cold_sets_from_the_busiest_worker() -> None:
    m = manager(gpu=16)
    seqs = [create(m, list(range(100 * i, 100 * i + 8)), 0) for i in range(6)]  # 12 blocks
    m.pin(seqs[0])
    plan = plan_rebalance(m, threshold=0.2)
    assert plan is not None
    src, dst, groups = plan
    assert (src, dst) == (0, 1)
    assert groups == [[seqs[1]], [seqs[2]], [seqs[3]]]  # 6 blocks evens 12 / 0; pinned stays
    for group in groups:
        migrate(m, group, dst)
    assert plan_rebalance(m, threshold=0.2) is None


def test_sharing_groups_join_sequences_through_shared_blocks() -> None:
    m = manager()
    a = create(m, list(range(8)))
    b, c = m.fork(a, 2)
    d = create(m, list(range(100, 104)))
    assert sharing_groups(m, 0) == [[a, b, c], [d]]


@pytest.mark.parametrize("seed", range(3))
def test_random_moves_keep_every_invariant(seed: int) -> None:
    import random

    rng = random.Random(seed)
    m = manager(gpu=24, cpu=8, num_workers=3)
    live: list[int] = []
    prefixes = [list(range(p * 50, p * 50 + 12)) for p in range(3)]
    for _ in range(120):
        op = rng.random()
        if op < 0.35 or not live:
            tokens = [*rng.choice(prefixes), *rng.sample(range(1000, 2000), rng.randint(1, 9))]
            result = m.create(None, tokens)
            if isinstance(result, CreateResult):
                live.append(result.seq_id)
                if rng.random() < 0.7:
                    m.mark_computed(result.seq_id, len(tokens))
        elif op < 0.45:
            live += m.fork(rng.choice(live), 1)
        elif op < 0.55:
            sid = rng.choice(live)
            m.free(sid)
            live.remove(sid)
        elif op < 0.6:
            m.offload([rng.choice(live)])
        elif op < 0.65:
            m.pin(rng.choice(live))
        else:
            worker = rng.randrange(3)
            groups = sharing_groups(m, worker)
            if groups:
                group = rng.choice(groups)
                dst = rng.choice([w for w in range(3) if w != worker])
                before = snapshot(m)
                result = plan_migration(m, group, dst)
                if isinstance(result, OutOfMemory):
                    assert snapshot(m) == before
        m.check_invariants()
