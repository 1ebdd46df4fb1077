"""KVCacheManager: exact block ids, commands, prefix hits, eviction and swap order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from core_helpers import create

import kvservice.core.manager_steps as steps_module
import kvservice.core.prefix_cache as prefix_module
from kvservice.core.commands import (
    CopyBlocks,
    CreateResult,
    FreeBlocks,
    OutOfMemory,
    StepResult,
    SwapIn,
    SwapOut,
)
from kvservice.core.ids import Tier
from kvservice.core.manager import KVCacheManager

Make = Callable[..., KVCacheManager]
GPU, CPU = Tier.GPU, Tier.CPU



def computed(m: KVCacheManager, tokens: list[int], tenant: str | None = None) -> int:
    sid = create(m, tokens, tenant)
    m.mark_computed(sid, len(tokens))
    return sid


def test_create_and_append_take_blocks_in_order(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    result = m.create(None, list(range(10)))
    assert result == CreateResult(0, 0, 0, [])
    assert m.sequence(0).block_ids == [0, 1, 2]
    assert m.append(0, [1, 2, 3]) == StepResult([])
    view = m.sequence(0)
    assert view.block_ids == [0, 1, 2, 3] and view.tokens == [*range(10), 1, 2, 3]
    assert view.tiers == [GPU] * 4
    m.check_invariants()


def test_fork_shares_blocks_and_the_first_write_copies(make_manager: Make) -> None:
    m = make_manager(gpu=8)
    parent = create(m, list(range(10)))
    (child,) = m.fork(parent, 1)
    assert m.sequence(child).block_ids == [0, 1, 2]
    assert m.usage()[0][GPU].used == 3
    assert m.append(child, [7]) == StepResult([CopyBlocks(0, ((2, 3),))])
    assert m.sequence(child).block_ids == [0, 1, 3]
    assert m.append(parent, [8]) == StepResult([])  # sole owner now: writes in place
    assert m.sequence(parent).block_ids == [0, 1, 2]
    assert m.free(parent) == [FreeBlocks(0, GPU, (2,))]
    assert m.free(child) == [FreeBlocks(0, GPU, (3, 1, 0))]
    m.check_invariants()


def test_prefix_hits_share_full_blocks_of_the_same_tenant_only(make_manager: Make) -> None:
    m = make_manager(gpu=16)
    computed(m, list(range(10)), "a")  # blocks 0 1 2; 0 and 1 are full
    assert m.lookup_prefix("a", [*range(8), 50, 51]) == {0: 8}
    hit = m.create("a", [*range(8), 50, 51])
    assert isinstance(hit, CreateResult) and hit.num_cached_tokens == 8
    assert m.sequence(hit.seq_id).block_ids == [0, 1, 3]
    other = m.create("b", [*range(8), 50, 51])
    assert isinstance(other, CreateResult) and other.num_cached_tokens == 0
    # An exact repeat still computes its last token: only the first block is shared.
    repeat = m.create("a", list(range(8)))
    assert isinstance(repeat, CreateResult) and repeat.num_cached_tokens == 4
    assert m.sequence(repeat.seq_id).block_ids == [0, 7]
    m.check_invariants()


def test_a_hash_collision_is_a_miss(make_manager: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    def collide(parent: int, data: bytes) -> int:
        return 1  # every block of every prompt gets the same hash

    monkeypatch.setattr(prefix_module, "chain_hash", collide)
    monkeypatch.setattr(steps_module, "chain_hash", collide)
    m = make_manager(gpu=16)
    computed(m, list(range(9)))
    assert m.lookup_prefix(None, [9, 9, 9, 9, 9]) == {}
    miss = m.create(None, [9, 9, 9, 9, 9])
    assert isinstance(miss, CreateResult) and miss.num_cached_tokens == 0
    assert m.lookup_prefix(None, [0, 1, 2, 3, 4]) == {0: 4}
    # Block 1 collides with block 0 inside the index, so only block 0 is cached.
    assert m.lookup_prefix(None, list(range(9))) == {0: 4}
    m.check_invariants()


def test_cached_blocks_are_evicted_least_recently_released_first(make_manager: Make) -> None:
    m = make_manager(gpu=4)
    a = computed(m, [1, 1, 1, 1, 1])  # blocks 0 (cached when freed) and 1
    b = computed(m, [2, 2, 2, 2, 2])  # blocks 2 (cached when freed) and 3
    m.free(a)
    m.free(b)
    assert m.usage()[0][GPU].cached == 2
    c = create(m, [3] * 9)
    assert m.sequence(c).block_ids == [3, 1, 0]  # free blocks, then a's cached block
    assert m.lookup_prefix(None, [1, 1, 1, 1, 1]) == {}
    assert m.lookup_prefix(None, [2, 2, 2, 2, 2]) == {0: 4}
    m.check_invariants()


def test_out_of_memory_is_a_value_and_changes_nothing(
    make_manager: Make, snap: Callable[[KVCacheManager], Any]
) -> None:
    m = make_manager(gpu=4, cpu=0)
    a = create(m, list(range(16)))
    before = snap(m)
    assert isinstance(m.create(None, [1]), OutOfMemory)
    assert isinstance(m.append(a, [1]), OutOfMemory)
    assert isinstance(m.prepare_decode([a], [1]), OutOfMemory)
    assert snap(m) == before
    (child,) = m.fork(a, 1)
    before = snap(m)
    assert isinstance(m.prepare_write(child, 0, 4), OutOfMemory)  # needs a copy of block 0
    assert snap(m) == before
    m.check_invariants()


def test_least_recently_used_sequences_swap_out_first(make_manager: Make) -> None:
    m = make_manager(gpu=4, cpu=4)
    a = create(m, list(range(8)))
    b = create(m, list(range(10, 18)))
    m.prepare_attention([a])  # b is now the coldest
    result = m.create(None, list(range(20, 28)))
    assert isinstance(result, CreateResult)
    assert result.commands == [SwapOut(0, ((2, 0), (3, 1)))]
    assert m.sequence(result.seq_id).block_ids == [2, 3]
    assert m.sequence(b).tiers == [CPU, CPU]
    plan = m.prepare_attention([b])
    assert not isinstance(plan, OutOfMemory)
    assert plan.commands == [SwapOut(0, ((0, 2), (1, 3))), SwapIn(0, ((0, 0), (1, 1)))]
    assert plan.block_tables == [[0, 1]] and plan.seq_lens == [8]
    assert m.sequence(a).tiers == [CPU, CPU]
    m.check_invariants()


def test_pins_keep_sequences_in_place_until_they_end(make_manager: Make) -> None:
    now = [100.0]
    m = make_manager(gpu=4, cpu=4, clock=lambda: now[0])
    a = create(m, list(range(8)))
    b = create(m, list(range(10, 18)))
    m.prepare_attention([b])  # a is now the coldest
    m.pin(a)
    result = m.create(None, list(range(20, 28)))
    assert isinstance(result, CreateResult) and m.sequence(b).tiers == [CPU, CPU]
    assert m.sequence(a).pinned == "hard" and m.sequence(a).tiers == [GPU, GPU]
    m.unpin(a)
    c = result.seq_id
    m.pin(c, hard=False, ttl_s=5.0)
    m.prepare_attention([a])  # coldest first: b (on CPU already), c, a
    assert not isinstance(m.prepare_attention([b]), OutOfMemory)
    assert m.sequence(a).tiers == [CPU, CPU]  # c was colder but soft-pinned
    assert m.sequence(c).tiers == [GPU, GPU]
    now[0] += 6.0  # the soft pin ends by itself
    assert not isinstance(m.prepare_attention([a]), OutOfMemory)
    assert m.sequence(c).tiers == [CPU, CPU] and m.sequence(c).pinned is None
    m.check_invariants()


def test_a_pinned_prompt_stays_cached_after_free(make_manager: Make) -> None:
    m = make_manager(gpu=6, cpu=0)
    system = computed(m, list(range(9)))  # blocks 0 1 2
    m.pin(system)
    assert m.free(system) == []  # the pin still holds every block
    assert m.usage()[0][GPU].used == 3
    other = create(m, list(range(50, 62)))
    assert m.sequence(other).block_ids == [3, 4, 5]
    assert isinstance(m.create(None, [7]), OutOfMemory)  # pinned blocks are not evictable
    assert m.lookup_prefix(None, [*range(8), 99]) == {0: 8}
    assert m.unpin(system) == [FreeBlocks(0, GPU, (2,))]  # 0 and 1 stay cached
    usage = m.usage()[0][GPU]
    assert (usage.used, usage.cached, usage.free) == (3, 2, 1)
    m.check_invariants()
