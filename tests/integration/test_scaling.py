"""Scaling a running Ray service of CPU worker actors: ``kvservice scale`` adds workers
(reusing a drained worker's bundle), drains one (its sequences move over the gloo
transfer group and read the same afterwards), scales down; sequences migrate by peer copy
(shared memory between CPU workers); the controller adds workers when the cluster's GPU
count grows. No sequence is lost on the way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kvservice.workers import find_worker_actors
from service_fixtures import ATOL, LAYOUT, Shadow

from kvservice import cli
from kvservice.coordinator import Coordinator
from kvservice.scaling import ScaleController, request_scale
from kvservice.transport_ray import start_ray_service

pytestmark = pytest.mark.integration

NAMESPACE = "kvservice-test-scaling"
BLOCKS = {"num_gpu_blocks": 48, "num_cpu_blocks": 8}


@pytest.fixture
def service(ray_cluster: None) -> Iterator[Coordinator]:
    coordinator = start_ray_service(
        LAYOUT, num_workers=2, use_gpu=False, namespace=NAMESPACE, recover=False,
        detached_workers=False, scaling=True, scale_interval_s=0.1, **BLOCKS,
    )  # fmt: skip
    try:
        yield coordinator
    finally:
        coordinator.close()


def check(coord: Coordinator, shadow: Shadow, lengths: dict[int, int]) -> None:
    for sid, length in sorted(lengths.items()):
        for layer in range(LAYOUT.num_layers):
            out, expected = shadow.attend(coord, layer, [sid], [1], [length], write=False)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def test_scale_up_drain_and_down_lose_nothing(service: Coordinator) -> None:
    coord, shadow = service, Shadow()
    assert coord.migrator.stats()["transfer_group"]["backend"] == "gloo"
    assert coord.migrator.stats()["transfer_group"]["peer_pairs"] == []  # gloo: off by default
    lengths: dict[int, int] = {}
    for i in range(6):
        info = coord.create_sequence([100 * i + t for t in range(9)])
        shadow.prefill(coord, info.seq_id, 9, 0)
        lengths[info.seq_id] = 9
    parent = next(iter(lengths))
    children = coord.fork(parent, 2)
    shadow.fork(parent, children)
    lengths.update({c: 9 for c in children})

    status = request_scale(NAMESPACE, workers=3, timeout_s=120)
    assert status["error"] is None and status["num_workers"] == 3
    assert coord.worker_ids == [0, 1, 2]
    assert coord.migrator.stats()["transfer_group"]["ranks"] == {0: 0, 1: 1, 2: 2}
    extra = coord.create_sequence([7, 8, 9])
    assert extra.worker_id == 2  # the empty one
    coord.free([extra.seq_id])

    on_0 = [s for s in lengths if coord.get_sequence(s).worker_id == 0]
    assert on_0
    before = coord.migrator.stats().get("transfers_group", 0)
    assert cli.main(["scale", "--drain", "0", "--namespace", NAMESPACE]) == 0
    assert coord.worker_ids == [1, 2]
    assert coord.migrator.stats()["transfers_group"] > before  # GPU-to-GPU path (gloo here)
    assert all(coord.get_sequence(s).worker_id in (1, 2) for s in lengths)
    check(coord, shadow, lengths)
    coord.check_invariants()

    status = request_scale(NAMESPACE, workers=1, timeout_s=120)
    assert status["error"] is None and len(coord.worker_ids) == 1
    check(coord, shadow, lengths)
    status = request_scale(NAMESPACE, workers=2, timeout_s=120)  # back into a vacant bundle
    assert status["error"] is None and len(coord.worker_ids) == 2
    assert request_scale(NAMESPACE)["num_workers"] == 2  # no request: the status
    check(coord, shadow, lengths)
    coord.check_invariants()


def test_sequences_migrate_by_peer_copy_and_read_the_same(service: Coordinator) -> None:
    # The path GPU workers of one host take by default, here over CPU workers' shared
    # memory: the migrator's group maps the pools, and a migration's blocks go by peer copy.
    coord, shadow = service, Shadow(seed=5)
    coord.migrator.group.peer_copy = "pull"
    coord.form_transfer_group()
    assert coord.migrator.stats()["transfer_group"]["peer_pairs"] == [[0, 1]]
    lengths: dict[int, int] = {}
    for i in range(4):
        info = coord.create_sequence([100 * i + t for t in range(9)])
        shadow.prefill(coord, info.seq_id, 9, 0)
        lengths[info.seq_id] = 9
    src = coord.get_sequence(next(iter(lengths))).worker_id
    moving = [s for s in lengths if coord.get_sequence(s).worker_id == src]
    before = coord.migrator.stats().get("transfers_peer", 0)
    coord.migrate(moving, 1 - src)
    assert coord.migrator.stats()["transfers_peer"] > before
    assert all(coord.get_sequence(s).worker_id == 1 - src for s in moving)
    check(coord, shadow, lengths)
    coord.check_invariants()


def test_the_controller_adds_a_worker_when_a_gpu_joins(ray_cluster: None) -> None:
    coord = start_ray_service(
        LAYOUT, num_workers=1, use_gpu=False, namespace=f"{NAMESPACE}-follow", recover=False,
        detached_workers=False, **BLOCKS,
    )  # fmt: skip
    gpus = [1]
    actors = find_worker_actors(f"{NAMESPACE}-follow")
    controller = ScaleController(
        coord, LAYOUT, namespace=f"{NAMESPACE}-follow", actors=actors, follow_gpus=True,
        detached=False, worker_kwargs=BLOCKS, cluster_gpus=lambda: gpus[0],
    )  # fmt: skip
    try:
        assert controller.reconcile()["num_workers"] == 1
        gpus[0] = 2  # a GPU node joined
        status = controller.reconcile()
        assert status["num_workers"] == 2 and coord.worker_ids == [0, 1], status
        info = coord.create_sequence([1, 2, 3])
        assert info.worker_id in (0, 1)
        gpus[0] = 1  # a GPU node left: its workers go with it; nothing is drained for it
        assert controller.reconcile()["num_workers"] == 2
    finally:
        controller.stop_workers()
        coord.close()
