"""A step ticket handed to other processes: each runs its share of a decode step straight
on the Ray worker actors, and the outputs are the coordinator's own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray
import torch
from service_fixtures import ATOL, LAYOUT, NUM_Q_HEADS, Shadow

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.transport_ray import start_ray_service

pytestmark = pytest.mark.integration

NAMESPACE = "kvservice-test-tickets"


@pytest.fixture
def service(ray_cluster: None) -> Iterator[Coordinator]:
    coordinator = start_ray_service(
        LAYOUT, num_workers=2, use_gpu=False, namespace=NAMESPACE, recover=False,
        detached_workers=False, num_gpu_blocks=48, num_cpu_blocks=8,
    )  # fmt: skip
    try:
        yield coordinator
    finally:
        coordinator.close()


@ray.remote
def run_elsewhere(ticket: Any, layer: int, q: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps - 1):
        ticket.attend(layer, q)
    return ticket.attend(layer, q)


def test_tickets_run_from_other_processes(service: Coordinator) -> None:
    coord, shadow = service, Shadow()
    ids = []
    for i in range(4):
        info = coord.create_sequence([100 * i + t for t in range(7)])
        shadow.prefill(coord, info.seq_id, 7, 0)
        ids.append(info.seq_id)
    assert {coord.get_sequence(s).worker_id for s in ids} == {0, 1}
    ticket = coord.open_ticket(ids, [1] * 4, writes=False)
    q = torch.randn(4, NUM_Q_HEADS, LAYOUT.head_dim)
    expected = coord.attend(1, ids, [1] * 4, q)
    # Two processes at once, each with its own copy of the ticket (and its own plan keys).
    outs = ray.get([run_elsewhere.remote(ticket, 1, q, 3) for _ in range(2)])
    for out in outs:
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coord.free(ids[:1])  # revokes it: the workers refuse calls through it from now on
    with pytest.raises(errors.FailedPrecondition):
        ticket.attend(1, q)
    with pytest.raises(Exception, match="closed or was revoked"):
        ray.get(run_elsewhere.remote(ticket, 1, q, 1))
