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


def prefilled(coord: Coordinator, shadow: Shadow, *, base: int, length: int) -> list[int]:
    """Four sequences of ``length`` distinct tokens, written through the coordinator."""
    ids = []
    for i in range(4):
        info = coord.create_sequence([base * i + t for t in range(length)])
        shadow.prefill(coord, info.seq_id, length, 0)
        ids.append(info.seq_id)
    return ids


@ray.remote
def run_elsewhere(ticket: Any, layer: int, q: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps - 1):
        ticket.attend(layer, q)
    return ticket.attend(layer, q)


def test_tickets_run_from_other_processes(service: Coordinator) -> None:
    coord, shadow = service, Shadow()
    ids = prefilled(coord, shadow, base=100, length=7)
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


def test_ticket_calls_in_flight_together_each_get_their_output(service: Coordinator) -> None:
    # Ticket calls run on the workers' ticket threads, beside each other and the
    # coordinator's calls: many in flight at once, each output is its own query's.
    coord, shadow = service, Shadow()
    ids = prefilled(coord, shadow, base=50, length=9)
    ticket = coord.open_ticket(ids, [1] * 4, writes=False)
    qs = [torch.randn(4, NUM_Q_HEADS, LAYOUT.head_dim) for _ in range(8)]
    pending = [ticket.submit(layer % 2, q) for layer, q in enumerate(qs)]
    coord_out = coord.attend(0, ids, [1] * 4, qs[0])  # an ordered call among them
    outs = [ticket.wait(calls) for calls in pending]
    torch.testing.assert_close(coord_out, outs[0], atol=ATOL, rtol=1e-4)
    for layer, (q, out) in enumerate(zip(qs, outs, strict=True)):
        torch.testing.assert_close(
            out, coord.attend(layer % 2, ids, [1] * 4, q), atol=ATOL, rtol=1e-4
        )
    coord.close_ticket(ticket.ticket_id)


def test_the_ticket_threads_take_only_attend_through_a_ticket(service: Coordinator) -> None:
    coord = service
    info = coord.create_sequence(list(range(5)))
    handle = coord._handles[info.worker_id]
    actor, epoch = handle.actor, handle.epoch  # type: ignore[attr-defined]
    q = torch.randn(1, NUM_Q_HEADS, LAYOUT.head_dim)
    for method, kwargs in (
        ("write_kv", {"ticket": 1}),
        ("attend", {}),
        ("attend", {"ticket": None}),
    ):
        with pytest.raises(Exception, match="only attend through a step ticket"):
            ray.get(
                actor.ticket_call.options(concurrency_group="tickets").remote(
                    epoch, method, 0, None, q, **kwargs
                )
            )
    coord.free([info.seq_id])


def test_ticket_calls_beside_the_coordinator_s_commands_stay_exact(service: Coordinator) -> None:
    # Threads keep ticket calls in flight over some sequences while the coordinator
    # creates, writes, attends, forks and frees others on the same workers: the ticket
    # threads and the ordered thread share the worker, and neither sees the other's work.
    import threading

    coord, shadow = service, Shadow(seed=3)
    ids = prefilled(coord, shadow, base=70, length=6)
    ticket = coord.open_ticket(ids, [1] * 4, writes=False)
    q = torch.randn(4, NUM_Q_HEADS, LAYOUT.head_dim)
    expected = coord.attend(1, ids, [1] * 4, q)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run_ticket() -> None:
        try:
            while not stop.is_set():
                pending = [ticket.submit(1, q) for _ in range(3)]
                for calls in pending:
                    torch.testing.assert_close(ticket.wait(calls), expected, atol=ATOL, rtol=1e-4)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run_ticket) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            info = coord.create_sequence([900 + 10 * i + t for t in range(5)])
            shadow.prefill(coord, info.seq_id, 5, info.num_cached_tokens)
            children = coord.fork(info.seq_id, 2)
            shadow.fork(info.seq_id, children)
            coord.append_tokens(children[:1], [[1]])
            out, want = shadow.attend(coord, 0, children[:1], [1], [6])
            torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-4)
            coord.free([info.seq_id, *children])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[0]
    coord.close_ticket(ticket.ticket_id)


def _channel_calls(coord: Coordinator) -> dict[int, int]:
    out = {}
    for wid, handle in coord._handles.items():
        channel = handle.call("stats")["channel"]
        out[wid] = 0 if channel is None else channel["calls"]
    return out


def test_ticket_calls_take_the_local_channel_or_ray_alike(service: Coordinator) -> None:
    # Callers on the workers' host send ticket calls through the workers' local channels;
    # with the channel off they go through Ray: the same outputs, the same fencing.
    coord, shadow = service, Shadow(seed=5)
    ids = prefilled(coord, shadow, base=30, length=8)
    ticket = coord.open_ticket(ids, [1] * 4, writes=False)
    q = torch.randn(4, NUM_Q_HEADS, LAYOUT.head_dim)
    expected = coord.attend(0, ids, [1] * 4, q)
    before = _channel_calls(coord)
    torch.testing.assert_close(ticket.attend(0, q), expected, atol=ATOL, rtol=1e-4)
    through = _channel_calls(coord)
    assert all(through[w] == before[w] + 1 for w in before)  # one call per worker
    for group in ticket.groups:
        group.handle.use_channel = False
    torch.testing.assert_close(ticket.attend(0, q), expected, atol=ATOL, rtol=1e-4)
    assert _channel_calls(coord) == through
    for group in ticket.groups:
        group.handle.use_channel = True
    # A copy of the ticket (as a process receives one per step) shares the connections.
    copy = ray.get(ray.put(ticket))
    assert copy.groups[0].handle is not ticket.groups[0].handle
    torch.testing.assert_close(copy.attend(0, q), expected, atol=ATOL, rtol=1e-4)
    for mine, theirs in zip(ticket.groups, copy.groups, strict=True):
        assert mine.handle._local_channel() is theirs.handle._local_channel() is not None
    coord.free(ids[:1])  # revoked: refused on the channel too
    with pytest.raises(errors.FailedPrecondition):
        ticket.attend(0, q)
