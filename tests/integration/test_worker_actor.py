"""Worker actors on the session's local Ray: calls round-trip tensors, blocks move
between two actors, and a killed actor comes back as a new, empty worker."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from kvservice.workers import (
    AttendPlan,
    Worker,
    WorkerGroup,
    find_worker_actors,
    start_worker_actors,
    stop_worker_actors,
)

from kvservice.core.errors import FailedPrecondition, InvalidArgument
from kvservice.core.ids import BlockId, SeqId, TenantId, Tier
from kvservice.core.layout import Layout
from kvservice.core.records import BlockRecord, SeqRecord

pytestmark = pytest.mark.integration

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)
NAMESPACE = "kvservice-test-workers"
SIZES = {"num_gpu_blocks": 16, "num_cpu_blocks": 4}


@pytest.fixture(scope="module")
def group(ray_cluster: None) -> Iterator[WorkerGroup]:
    workers = start_worker_actors(
        LAYOUT, 2, use_gpu=False, first_worker_id=10, namespace=NAMESPACE, max_restarts=2, **SIZES
    )
    try:
        yield workers
    finally:
        stop_worker_actors(workers)


def call(handle, method: str, *args, **kwargs):
    import ray

    return ray.get(getattr(handle, method).remote(*args, **kwargs), timeout=60)


def test_actors_are_named_and_found_in_their_namespace(group: WorkerGroup) -> None:
    found = find_worker_actors(NAMESPACE)
    assert sorted(found) == [10, 11]
    infos = [call(found[i], "info") for i in (10, 11)]
    assert [info.worker_id for info in infos] == [10, 11]
    assert all(info.device == "cpu" and info.layout == LAYOUT for info in infos)
    assert infos[0].epoch != infos[1].epoch
    assert find_worker_actors("some-other-namespace") == {}
    with pytest.raises(FailedPrecondition, match="already run"):
        start_worker_actors(
            LAYOUT, 1, use_gpu=False, first_worker_id=11, namespace=NAMESPACE, **SIZES
        )


def test_calls_round_trip_and_blocks_move_between_actors(group: WorkerGroup) -> None:
    gen = torch.Generator().manual_seed(0)
    first, second = group.actors[10], group.actors[11]
    local = Worker(0, LAYOUT, **SIZES)
    k = torch.randn(7, 2, 16, generator=gen)
    v = torch.randn(7, 2, 16, generator=gen)
    q = torch.randn(3, 4, 16, generator=gen)
    slots = torch.arange(20, 24)  # block 5; the 3 new tokens land in block 6
    plan = AttendPlan(block_tables=[[5, 6]], seq_lens=[7], q_lens=[3])
    for worker_call in (lambda *a, **kw: call(first, *a, **kw), local_call(local)):
        worker_call("write_kv", 0, slots, k[:4], v[:4])
    got = call(first, "attend", 0, plan, q, k[4:], v[4:], return_lse=True)
    want = local.attend(0, plan, q, k[4:], v[4:], return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    # copy-on-write, swap out and back in, then move the blocks to the other actor
    call(first, "copy_blocks", [(6, 9)])
    call(first, "swap_out", [(5, 0), (9, 1)])
    call(first, "swap_in", [(0, 12), (1, 13)])
    data = call(first, "export_blocks", Tier.GPU, [12, 13])
    assert torch.equal(data, local.export_blocks(Tier.GPU, [5, 6]))
    call(second, "import_blocks", Tier.GPU, [2, 3], data)
    moved = AttendPlan(block_tables=[[2, 3]], seq_lens=[7], q_lens=[3])
    assert torch.equal(call(second, "attend", 0, moved, q), want[0])

    stats = call(first, "stats")
    assert stats["bytes_swapped"] == {
        "gpu_to_cpu": 2 * LAYOUT.block_bytes,
        "cpu_to_gpu": 2 * LAYOUT.block_bytes,
    }
    assert stats["kernel_time"]["paged_extend"]["calls"] == 1


def local_call(worker: Worker):
    return lambda method, *args, **kwargs: getattr(worker, method)(*args, **kwargs)


def test_errors_reach_the_caller_as_invalid_argument(group: WorkerGroup) -> None:
    with pytest.raises(InvalidArgument, match="outside"):
        call(group.actors[10], "copy_blocks", [(0, 99)])
    # the actor survives a refused call
    assert call(group.actors[10], "info").worker_id == 10


def test_a_killed_actor_restarts_with_a_new_epoch_and_an_empty_ledger(group: WorkerGroup) -> None:
    import ray

    handle = group.actors[11]
    before = call(handle, "info")
    record = SeqRecord(
        seq_id=SeqId(1),
        tenant=TenantId("t"),
        tokens=(1, 2, 3),
        blocks=(BlockRecord(BlockId(0), Tier.GPU),),
    )
    call(handle, "update_ledger", {1: record}, [])
    call(handle, "import_blocks", Tier.GPU, [0], torch.ones(1, *LAYOUT.block_shape))
    assert call(handle, "ledger").records == {1: record}

    ray.kill(handle, no_restart=False)
    # the kill lands asynchronously: wait for the restarted worker (a new epoch)
    deadline = time.monotonic() + 60
    after = before
    while after.epoch == before.epoch:
        assert time.monotonic() < deadline, "the worker did not come back with a new epoch"
        try:
            after = call(handle, "info")
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    assert after.worker_id == before.worker_id
    ledger = call(handle, "ledger")
    assert ledger.epoch == after.epoch and ledger.records == {}
    assert torch.count_nonzero(call(handle, "export_blocks", Tier.GPU, [0])) == 0
    # still found under its name
    assert call(find_worker_actors(NAMESPACE)[11], "info").epoch == after.epoch
