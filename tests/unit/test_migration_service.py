"""Moving sequences between local CPU workers through the coordinator: the attention a
moved sequence gives afterwards matches the dense oracle, tables and ledgers follow, a
drained worker leaves, a new worker takes load, long prefixes are copied rather than
recomputed, and a transfer that meets a dead worker loses only what it carried."""

from __future__ import annotations

import pytest
import torch
from kvservice.workers import Worker
from service_fixtures import ATOL, LAYOUT, KillableHandle, Shadow, make_handles

from kvservice.coordinator import Coordinator
from kvservice.core import errors

BLOCKS = {"num_gpu_blocks": 32, "num_cpu_blocks": 16}


def make(num_workers: int, **options: object) -> tuple[Coordinator, list[KillableHandle]]:
    handles = make_handles(num_workers=num_workers, **BLOCKS)  # type: ignore[arg-type]
    return Coordinator(LAYOUT, handles, **options), handles  # type: ignore[arg-type]


def check(coord: Coordinator, shadow: Shadow, lengths: dict[int, int]) -> None:
    """Every sequence's attention (one query at its end, every layer) matches the oracle;
    one sequence at a time, since a worker may hold more than its GPU tier."""
    for sid, length in sorted(lengths.items()):
        for layer in range(LAYOUT.num_layers):
            out, expected = shadow.attend(coord, layer, [sid], [1], [length], write=False)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def populate(coord: Coordinator, shadow: Shadow, count: int, length: int = 10) -> dict[int, int]:
    lengths = {}
    for i in range(count):
        info = coord.create_sequence([1000 * (i + 1) + t for t in range(length)])
        shadow.prefill(coord, info.seq_id, length, info.num_cached_tokens)
        lengths[info.seq_id] = length
    return lengths


def worker_of(coord: Coordinator, seq_id: int) -> int:
    return coord.get_sequence(seq_id).worker_id


def test_a_migrated_sequence_reads_the_same_and_its_ledger_moves() -> None:
    coord, handles = make(2)
    shadow = Shadow()
    lengths = populate(coord, shadow, 4)
    sid = next(s for s in lengths if worker_of(coord, s) == 0)
    report = coord.migrate([sid], 1)
    assert report["sequences"] == 1 and report["blocks"] == 3
    assert report["bytes"] == 3 * LAYOUT.block_bytes
    assert worker_of(coord, sid) == 1
    check(coord, shadow, lengths)
    coord.check_invariants()
    assert sid not in handles[0].worker.ledger().records
    assert sid in handles[1].worker.ledger().records
    recovered = Coordinator.recover(LAYOUT, handles)
    assert recovered.get_sequence(sid).worker_id == 1
    check(recovered, shadow, lengths)


def test_forks_and_pins_drain_together_and_the_worker_leaves() -> None:
    coord, handles = make(3)
    shadow = Shadow()
    lengths = populate(coord, shadow, 6)
    on_0 = [s for s in lengths if worker_of(coord, s) == 0]
    assert on_0
    children = coord.fork(on_0[0], 2)
    lengths.update({c: lengths[on_0[0]] for c in children})
    shadow.fork(on_0[0], children)
    coord.manager.pin(on_0[0])
    used_before = coord.manager.usage()[0][0].used
    report = coord.drain_worker(0)
    assert report["removed"] and report["sequences"] == len(on_0) + 2
    assert report["blocks"] == used_before  # forks' shared blocks went once
    assert coord.worker_ids == [1, 2] and coord.manager.workers == [1, 2]
    assert len({worker_of(coord, s) for s in (on_0[0], *children)}) == 1  # kept together
    assert coord.manager.sequence(on_0[0]).pinned == "hard"
    check(coord, shadow, lengths)
    coord.check_invariants()
    new = coord.create_sequence(list(range(5)))  # placement only among those left
    assert new.worker_id in (1, 2)


def test_a_drain_without_room_moves_what_fits_and_keeps_the_worker() -> None:
    coord, _ = make(2)
    shadow = Shadow()
    lengths = {}
    for i in range(4):  # 13 blocks each, two per worker
        tokens = list(range(100 * i, 100 * i + 52))
        info = coord.create_sequence(tokens)
        shadow.prefill(coord, info.seq_id, len(tokens), 0)
        lengths[info.seq_id] = len(tokens)
    before = {s: worker_of(coord, s) for s in lengths}
    with pytest.raises(errors.ResourceExhausted, match="no room"):
        coord.drain_worker(0)
    assert coord.worker_ids == [0, 1]
    after = {s: worker_of(coord, s) for s in lengths}
    moved = [s for s in lengths if before[s] != after[s]]
    assert len(moved) == 1 and after[moved[0]] == 1  # one fitted (partly in the CPU tier)
    coord.check_invariants()
    stayed = [s for s in lengths if before[s] == 1]
    coord.free(stayed)  # room to bring the moved one back to the GPU tier
    check(coord, shadow, {s: n for s, n in lengths.items() if s not in stayed})
    with pytest.raises(errors.FailedPrecondition):
        make(1)[0].drain_worker(0)
    with pytest.raises(errors.NotFound):
        coord.drain_worker(7)


def test_a_new_worker_takes_load_by_rebalancing() -> None:
    coord, handles = make(1)
    shadow = Shadow()
    lengths = populate(coord, shadow, 8)  # 24 of 32 blocks
    worker = Worker(5, LAYOUT, device="cpu", **BLOCKS)
    coord.add_worker(KillableHandle(5, worker))
    assert coord.worker_ids == [0, 5]
    report = coord.rebalance(threshold=0.1)
    assert report["sequences"] == 4
    loads = {w: u[0].used for w, u in coord.manager.usage().items()}
    assert loads == {0: 12, 5: 12}
    check(coord, shadow, lengths)
    coord.check_invariants()
    assert coord.rebalance(threshold=0.1)["sequences"] == 0
    with pytest.raises(errors.FailedPrecondition):
        coord.add_worker(KillableHandle(5, worker))


def test_a_long_prefix_is_copied_to_the_less_busy_worker() -> None:
    handles = make_handles(num_workers=2, num_gpu_blocks=640, num_cpu_blocks=0)
    coord = Coordinator(LAYOUT, handles)
    shadow = Shadow()
    system = list(range(500, 540))  # ten blocks
    first = coord.create_sequence([*system, *range(300)])  # 85 blocks: over the slack
    shadow.prefill(coord, first.seq_id, 340, 0)
    second = coord.create_sequence([*system, 3])
    assert second.worker_id != first.worker_id  # the first one's worker is busier
    assert second.num_cached_tokens == 40  # copied over, not recomputed
    assert coord.migrator.stats()["prefix_copies"] == 1
    shadow.share(first.seq_id, second.seq_id, 40)
    shadow.prefill(coord, second.seq_id, 41, 40)
    check(coord, shadow, {first.seq_id: 340, second.seq_id: 41})
    third = coord.create_sequence([*system, 4])  # both cache it now: the roomier one
    assert (third.worker_id, third.num_cached_tokens) == (second.worker_id, 40)
    assert coord.migrator.stats()["prefix_copies"] == 1
    coord.check_invariants()


def test_a_dead_source_loses_the_sequences_in_flight_and_its_own() -> None:
    coord, handles = make(2)
    shadow = Shadow()
    lengths = populate(coord, shadow, 4)
    on_0 = [s for s in lengths if worker_of(coord, s) == 0]
    on_1 = [s for s in lengths if worker_of(coord, s) == 1]
    handles[0].killed = True
    with pytest.raises(errors.DataLoss) as lost:
        coord.migrate([on_0[0]], 1)
    assert set(on_0) <= set(lost.value.seq_ids)
    with pytest.raises(errors.DataLoss):
        coord.get_sequence(on_0[0])
    check(coord, shadow, {s: lengths[s] for s in on_1})
    coord.free(on_0)
    coord.check_invariants()


def test_bad_migrations_are_refused_and_change_nothing() -> None:
    coord, _ = make(2)
    shadow = Shadow()
    lengths = populate(coord, shadow, 2)
    sid = next(iter(lengths))
    with pytest.raises(errors.InvalidArgument):
        coord.migrate([sid], worker_of(coord, sid))
    with pytest.raises(errors.NotFound):
        coord.migrate([sid], 9)
    with pytest.raises(errors.NotFound):
        coord.migrate([12345], 1)
    check(coord, shadow, lengths)
    coord.check_invariants()


def test_a_long_sequences_segments_follow_a_drain_and_survive_a_restart() -> None:
    handles = make_handles(num_workers=3, **BLOCKS)  # type: ignore[arg-type]
    coord = Coordinator(LAYOUT, handles, segment_tokens=8)  # segments of two blocks
    shadow = Shadow()
    info = coord.create_sequence(list(range(8)))
    shadow.prefill(coord, info.seq_id, 8, 0)
    length = 8
    while length < 40:  # four more segments, appended and computed a block at a time
        coord.append_tokens([info.seq_id], [list(range(length, length + 4))])
        length += 4
        for layer in range(LAYOUT.num_layers):
            out, expected = shadow.attend(coord, layer, [info.seq_id], [4], [length])
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    first = worker_of(coord, info.seq_id)
    segments = coord._spans.segments(info.seq_id, first, length)
    assert len(segments) == 5 and coord.stats()["long_sequences"]["count"] == 1
    report = coord.drain_worker(first)
    assert report["sequences"] >= 1 and first not in coord.worker_ids
    assert worker_of(coord, info.seq_id) != first
    assert all(s.worker_id in coord.worker_ids for s in segments)
    check(coord, shadow, {info.seq_id: length})
    coord.check_invariants()
    recovered = Coordinator.recover(
        LAYOUT, [h for h in handles if h.worker_id != first], segment_tokens=8
    )
    check(recovered, shadow, {info.seq_id: length})
    recovered.check_invariants()


def test_a_move_between_the_layers_of_a_step_is_not_read_from_a_kept_plan() -> None:
    coord, _ = make(2)
    shadow = Shadow()
    lengths = populate(coord, shadow, 4)
    sid = next(s for s in lengths if worker_of(coord, s) == 0)
    coord.append_tokens([sid], [[7]])
    lengths[sid] += 1
    out, expected = shadow.attend(coord, 0, [sid], [1], [lengths[sid]])  # layer 0 plans the step
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coord.migrate([sid], 1)
    other = next(s for s in lengths if worker_of(coord, s) == 0)
    coord.free([other])  # its blocks are free on worker 0 now
    del lengths[other]
    coord.migrate([sid], 0)  # back, into other blocks
    assert worker_of(coord, sid) == 0
    out, expected = shadow.attend(coord, 1, [sid], [1], [lengths[sid]])  # same step, layer 1
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    check(coord, shadow, lengths)
