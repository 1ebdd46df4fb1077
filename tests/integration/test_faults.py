"""Faults on the local Ray cluster with CPU worker actors: a worker killed mid-run, the
coordinator killed and restarted.

Every attention output is checked against the dense oracle (``Shadow``), so "identical
results" means: exactly what the same calls give on a service that never failed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from kvservice.workers import find_worker_actors
from service_fixtures import ATOL, LAYOUT, Shadow

from kvservice.client import Client
from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.scaling import ScaleController
from kvservice.transport_ray import start_ray_service, worker_namespace

pytestmark = pytest.mark.integration

NUM_BLOCKS = 128


def close(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def step(service: Any, shadow: Shadow, seq_ids: list[int], lengths: dict[int, int], token: int) -> None:
    """One decode step of ``seq_ids`` on ``service``, checked against the oracle."""
    service.append_tokens(seq_ids, [[token]] * len(seq_ids))
    for sid in seq_ids:
        lengths[sid] += 1
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(service, layer, seq_ids, [1] * len(seq_ids), [lengths[s] for s in seq_ids]))


def wait_for_restart(actor: Any, old_epoch: int, timeout: float = 60.0) -> int:
    """The epoch of the restarted actor, once it answers again."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            epoch = ray.get(actor.info.remote(), timeout=10).epoch
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
            continue
        if epoch != old_epoch:
            return epoch
        time.sleep(0.2)
    raise AssertionError("the killed worker actor did not come back")


@pytest.fixture
def ray_service(ray_cluster: None) -> Iterator[tuple[Coordinator, str]]:
    namespace = f"faults-{uuid.uuid4().hex[:8]}"
    coordinator = start_ray_service(
        LAYOUT, num_workers=2, namespace=namespace, num_gpu_blocks=NUM_BLOCKS,
        num_cpu_blocks=NUM_BLOCKS, detached_workers=False,
    )  # fmt: skip
    try:
        yield coordinator, namespace
    finally:
        coordinator.close()


def test_a_killed_worker_loses_only_its_sequences_and_comes_back_empty(
    ray_service: tuple[Coordinator, str],
) -> None:
    import ray

    coordinator, namespace = ray_service
    # The scale controller of ``kvservice serve`` (run by hand here) takes restarted
    # workers back; set to two workers, it must not start a replacement meanwhile.
    controller = ScaleController(
        coordinator, LAYOUT, namespace=namespace, actors=find_worker_actors(namespace),
        detached=False, worker_kwargs={"num_gpu_blocks": NUM_BLOCKS, "num_cpu_blocks": NUM_BLOCKS},
    )  # fmt: skip
    controller.target = 2
    assert controller.rejoiner.rejoin() == []  # nothing to take back while all serve
    shadow = Shadow(seed=3)
    lengths: dict[int, int] = {}
    by_worker: dict[int, list[int]] = {0: [], 1: []}
    for i in range(6):
        info = coordinator.create_sequence([i] * 3 + list(range(6)))
        shadow.prefill(coordinator, info.seq_id, 9, 0)
        lengths[info.seq_id] = 9
        by_worker[info.worker_id].append(info.seq_id)
    assert by_worker[0] and by_worker[1]
    kept, doomed = by_worker[0], by_worker[1]

    # Worker 0's sequences keep decoding on another thread, before, during and after.
    stop = threading.Event()
    steps: list[int] = []
    failures: list[BaseException] = []

    def decode() -> None:
        try:
            while not stop.is_set():
                step(coordinator, shadow, kept, lengths, 100 + len(steps))
                steps.append(1)
                stop.wait(0.1)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    runner = threading.Thread(target=decode)
    runner.start()
    try:
        while len(steps) < 2 and not failures:
            time.sleep(0.05)
        actor = find_worker_actors(namespace)[1]
        old_epoch = ray.get(actor.info.remote()).epoch
        ray.kill(actor, no_restart=False)
        # Ray brings the actor back with empty pools; nothing has called it meanwhile,
        # so only the epoch fence stands between its sequences and those empty pools.
        wait_for_restart(actor, old_epoch)
        before = len(steps)
        while len(steps) < before + 2 and not failures:
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join()
    assert not failures, failures

    # Its sequences: DATA_LOSS naming every one of them, until freed.
    with pytest.raises(errors.DataLoss) as lost:
        shadow.attend(coordinator, 0, [doomed[0]], [1], [9], write=False)
    assert sorted(lost.value.seq_ids) == sorted(doomed)
    with pytest.raises(errors.DataLoss) as again:
        coordinator.append_tokens([doomed[-1]], [[1]])
    assert again.value.seq_ids == [doomed[-1]]
    # A batch naming a lost sequence changes nothing for the others in it.
    with pytest.raises(errors.DataLoss):
        coordinator.append_tokens([kept[0], doomed[0]], [[1], [1]])
    step(coordinator, shadow, kept, lengths, 7)
    assert coordinator.stats()["sequences_live"] == len(kept)

    # The worker comes back empty and its capacity returns.
    status = controller.reconcile()
    assert status["num_workers"] == 2 and coordinator.worker_ids == [0, 1], status
    assert status["changes"][0] == "workers [1] restarted and rejoined, empty", status
    assert not any(change.startswith("added") for change in status["changes"]), status
    assert controller.rejoiner.rejoin() == []
    # All its blocks are free but those of sequences the pass moved there (rebalancing).
    moved = {s: coordinator.get_sequence(s) for s in kept}
    moved = {s: info for s, info in moved.items() if info.worker_id == 1}
    gpu, cpu = coordinator.manager.usage()[1].values()
    assert (gpu.total, cpu.total, cpu.used) == (NUM_BLOCKS, NUM_BLOCKS, 0)
    assert gpu.used == sum(info.num_blocks for info in moved.values())
    records = ray.get(find_worker_actors(namespace)[1].ledger.remote()).records
    assert set(records) == set(moved)  # nothing of the lost sequences came back with it
    coordinator.free(doomed)
    fresh = []
    for i in range(4):
        info = coordinator.create_sequence([50 + i] * 9)
        shadow.prefill(coordinator, info.seq_id, 9, 0)
        lengths[info.seq_id] = 9
        fresh.append(info)
    assert 1 in {info.worker_id for info in fresh}  # the emptiest worker gets new sequences
    step(coordinator, shadow, [i.seq_id for i in fresh if i.worker_id == 1], lengths, 8)
    step(coordinator, shadow, kept, lengths, 9)
    coordinator.check_invariants()


def test_a_restarted_coordinator_finds_every_sequence_and_generation_goes_on(
    ray_cluster: None,
) -> None:
    import ray

    name = f"faults-{uuid.uuid4().hex[:8]}"
    options: dict[str, Any] = {
        "name": name, "num_workers": 2, "num_gpu_blocks": NUM_BLOCKS,
        "num_cpu_blocks": NUM_BLOCKS, "detached": True,
    }  # fmt: skip
    first = Client.ray(LAYOUT, **options)
    second: Client | None = None
    try:
        shadow = Shadow(seed=5)
        lengths: dict[int, int] = {}
        seqs: list[int] = []
        for i in range(4):
            info = first.create_sequence([i] * 5 + list(range(6)))
            shadow.prefill(first, info.seq_id, 11, 0)
            lengths[info.seq_id] = 11
            seqs.append(info.seq_id)
        (child,) = first.fork(seqs[0], 1)
        shadow.fork(seqs[0], [child])
        lengths[child] = 11
        seqs.append(child)
        step(first, shadow, seqs, lengths, 1)
        first.free([seqs.pop(1)])
        before = {sid: first.get_sequence(sid) for sid in seqs}
        assert {info.worker_id for info in before.values()} == {0, 1}

        ray.kill(first.service._actor, no_restart=True)  # the coordinator dies
        wait_until_unnamed(name)
        assert sorted(find_worker_actors(worker_namespace(name))) == [0, 1]  # the workers live on
        second = Client.ray(LAYOUT, **options)  # a new coordinator, rebuilt from the ledgers

        for sid, info in before.items():
            again = second.get_sequence(sid)
            assert (again.length, again.worker_id, again.num_blocks, again.tiers) == (
                info.length, info.worker_id, info.num_blocks, info.tiers,
            )  # fmt: skip
        for token in (2, 3):
            step(second, shadow, seqs, lengths, token)
        (grandchild,) = second.fork(seqs[0], 1)
        shadow.fork(seqs[0], [grandchild])
        lengths[grandchild] = lengths[seqs[0]]
        step(second, shadow, [grandchild], lengths, 4)
        second.free([*seqs, grandchild])
        assert second.stats()["sequences_live"] == 0
    finally:
        for client in (first, second):
            actor = client.service._actor if client is not None else None
            if actor is not None:
                try:
                    ray.get(actor.shutdown.remote(), timeout=30)  # stops its workers
                except Exception:  # the first one is dead already
                    pass
                ray.kill(actor, no_restart=True)
        for actor in find_worker_actors(worker_namespace(name)).values():
            ray.kill(actor, no_restart=True)
        remove_placement_groups(worker_namespace(name))


def wait_until_unnamed(name: str, timeout: float = 60.0) -> None:
    """A killed actor keeps its name for a moment; a new one can only take it after."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.1)
    raise AssertionError(f"actor {name!r} is still registered")


def remove_placement_groups(namespace: str) -> None:
    """The workers' placement group outlives a coordinator that adopted them: free its CPUs."""
    from ray.util import placement_group_table
    from ray.util.placement_group import get_placement_group, remove_placement_group

    for entry in placement_group_table().values():
        name = entry.get("name", "")
        if name.startswith(f"kvservice-workers-{namespace}-") and entry.get("state") != "REMOVED":
            remove_placement_group(get_placement_group(name))


def test_ticket_calls_over_the_local_channel_see_a_killed_worker_as_lost(
    ray_service: tuple[Coordinator, str],
) -> None:
    # Calls through a ticket go over the worker's local channel (its Unix socket): once
    # the worker has died they fail as DATA_LOSS, on the connection it left and on a new
    # one to the empty incarnation Ray restarts (which holds neither the ticket nor the
    # epoch); nothing hangs.
    import ray

    coordinator, namespace = ray_service
    shadow = Shadow(seed=5)
    infos = [coordinator.create_sequence([50 + i] * 5) for i in range(4)]
    for info in infos:
        shadow.prefill(coordinator, info.seq_id, 5, 0)
    worker = infos[0].worker_id
    ids = [info.seq_id for info in infos if info.worker_id == worker]
    ticket = coordinator.open_ticket(ids, [1] * len(ids), writes=False)
    q = torch.randn(len(ids), 2 * LAYOUT.num_kv_heads, LAYOUT.head_dim)
    expected = coordinator.attend(0, ids, [1] * len(ids), q)
    close(ticket.attend(0, q), expected)
    assert coordinator._handles[worker].call("stats")["channel"]["calls"] >= 1

    actor = find_worker_actors(namespace)[worker]
    old_epoch = ray.get(actor.info.remote()).epoch
    ray.kill(actor, no_restart=False)
    # The kill is asynchronous: a call right after it may still reach the old process.
    wait_for_restart(actor, old_epoch)
    with pytest.raises(errors.DataLoss):  # on the connection the dead process left
        ticket.attend(0, q)
    with pytest.raises(errors.DataLoss):  # on a new one, to the new incarnation
        ticket.attend(0, q)
