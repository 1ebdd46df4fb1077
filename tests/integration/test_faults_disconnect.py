"""A client that goes away mid-call leaves no blocks behind (gRPC on 127.0.0.1).

The service is held inside the call (a gate) while the client cancels or closes its
channel, then let go: a create or fork that finishes for nobody is taken back, a
data-plane call finishes and changes nothing it should not, and the sequences of a
client that vanished for good are freed by their lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from service_fixtures import ATOL, LAYOUT, Shadow, make_coordinator

from kvservice.coordinator import Coordinator
from kvservice.grpc_client import GrpcTransport
from kvservice.leases import LeasedService
from kvservice.server import ServerThread
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.v1 import kvservice_pb2_grpc as pb_grpc
from kvservice.wire import encode_tensor

pytestmark = pytest.mark.integration


class Gate:
    """Holds calls of one method inside the service until ``open``."""

    def __init__(self, coordinator: Coordinator, method: str) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        inner: Callable[..., Any] = getattr(coordinator, method)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self._open.wait(30), "the test never opened the gate"
            return inner(*args, **kwargs)

        setattr(coordinator, method, held)

    def open(self) -> None:
        self._open.set()


def used_blocks(coordinator: Coordinator) -> int:
    return sum(u.used for tiers in coordinator.manager.usage().values() for u in tiers.values())


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def served() -> Iterator[tuple[Coordinator, ServerThread]]:
    coordinator = make_coordinator()
    with ServerThread(coordinator, port=0) as server:
        yield coordinator, server


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_create_whose_client_went_away_is_taken_back(
    served: tuple[Coordinator, ServerThread], how: str
) -> None:
    coordinator, server = served
    gate = Gate(coordinator, "create_sequence")
    channel = grpc.insecure_channel(server.address)
    call = pb_grpc.KVServiceStub(channel).CreateSequence.future(
        pb.CreateSequenceRequest(tokens=list(range(10)))
    )
    assert gate.entered.wait(10)
    call.cancel() if how == "cancel" else channel.close()
    time.sleep(0.2)  # let the server see the client go before the call ends
    gate.open()
    assert eventually(lambda: coordinator.stats()["sequences_live"] == 0)
    assert used_blocks(coordinator) == 0
    channel.close()
    coordinator.check_invariants()


def test_a_fork_whose_client_went_away_is_taken_back(served: tuple[Coordinator, ServerThread]) -> None:
    coordinator, server = served
    with GrpcTransport(server.address, timeout=30) as client:
        parent = client.create_sequence(list(range(10)))
    held = used_blocks(coordinator)
    gate = Gate(coordinator, "fork")
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.KVServiceStub(channel).Fork.future(pb.ForkRequest(seq_id=parent.seq_id, n=3))
        assert gate.entered.wait(10)
        call.cancel()
        time.sleep(0.2)
        gate.open()
        assert eventually(lambda: coordinator.stats()["sequences_live"] == 1)
    assert used_blocks(coordinator) == held
    coordinator.free([parent.seq_id])
    assert used_blocks(coordinator) == 0


def test_an_attend_whose_client_went_away_changes_nothing_else(
    served: tuple[Coordinator, ServerThread],
) -> None:
    coordinator, server = served
    shadow = Shadow()
    info = coordinator.create_sequence(list(range(9)))
    shadow.prefill(coordinator, info.seq_id, 9, 0)
    coordinator.append_tokens([info.seq_id], [[42]])
    held = used_blocks(coordinator)
    gate = Gate(coordinator, "attend")
    q = shadow.randn(1, 4, LAYOUT.head_dim)
    request = pb.AttendRequest(layer=0, seq_ids=[info.seq_id], q_lens=[1])
    encode_tensor(q, request.q)
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.KVServiceStub(channel).Attend.future(request)
        assert gate.entered.wait(10)
        call.cancel()
        time.sleep(0.2)
        gate.open()
        time.sleep(0.2)
    assert used_blocks(coordinator) == held
    # The sequence is as it was: its next step gives the oracle's answer.
    del coordinator.attend  # the gate's stand-in: back to the coordinator's own method
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coordinator, layer, [info.seq_id], [1], [10])
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coordinator.free([info.seq_id])
    assert used_blocks(coordinator) == 0


def test_a_client_that_vanished_for_good_loses_its_sequences_to_their_lease() -> None:
    coordinator = make_coordinator()
    service = LeasedService(coordinator, ttl_s=0.5, reap_interval_s=0.05)
    with ServerThread(service, port=0) as server:
        with GrpcTransport(server.address, timeout=30) as client:
            info = client.create_sequence(list(range(10)))
            client.fork(info.seq_id, 2)
            assert used_blocks(coordinator) == 3
        # The client is gone without freeing anything.
        assert eventually(lambda: used_blocks(coordinator) == 0)
        assert coordinator.stats()["sequences_live"] == 0
        assert coordinator.metrics.registry.get_sample_value("kvservice_leases_expired_total") == 3
    service.close()
