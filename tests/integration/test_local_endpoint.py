"""The gRPC server's local endpoint: the same KVService calls over an abstract Unix socket.

A transport on the server's host moves to the endpoint after its first call; every
answer, error class and message, token check and deadline must then be what the same
call gets over gRPC. The endpoint must refuse what is not a call (unknown methods,
requests that do not parse, bytes that are not frames) without harm to other
connections, free what a call made for a client that went away, and drain on ``stop``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from service_fixtures import LAYOUT, NUM_Q_HEADS, dense_attention, make_coordinator

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.grpc_client import LOCAL_ENDPOINT_ENV, AsyncGrpcTransport, GrpcTransport
from kvservice.local_client import EndpointUnreachable, LocalPool, LocalRpcError
from kvservice.local_frames import REQUEST, VERSION, encode_metadata, socket_name
from kvservice.server import ServerThread
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.v1 import kvservice_pb2_grpc as pb_grpc
from kvservice.wire import MAX_MESSAGE_BYTES, TENANT_KEY

pytestmark = pytest.mark.integration


def qkv(num_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kv_shape = (num_rows, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    q = torch.randn(num_rows, NUM_Q_HEADS, LAYOUT.head_dim, generator=gen)
    return q, torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)


class SlowService:
    """Forwards every call to ``service``; the methods named in ``delays`` first sleep.

    Not a Coordinator, so the servicer runs its calls on the thread pool. ``started``
    is set when a slowed call begins; ``results`` keeps what each slowed call returned.
    """

    def __init__(self, service: Coordinator, **delays: float) -> None:
        self._service = service
        self._delays = delays
        self.started = threading.Event()
        self.results: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._service, name)
        delay = self._delays.get(name)
        if delay is None:
            return method

        def slowed(*args: Any, **kwargs: Any) -> Any:
            self.started.set()
            time.sleep(delay)
            result = method(*args, **kwargs)
            self.results.append(result)
            return result

        return slowed


def call_on_a_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Starts ``call`` on a thread; the list gets what it returned or raised, for the test
    to check once the thread is joined."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # reported by the main thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def raw_call(
    pool: LocalPool, method: str, request: Any, metadata: Sequence[tuple[str, str]] = ()
) -> Any:
    return pool.call(method, request, encode_metadata(list(metadata)), 10.0)


@pytest.fixture
def served() -> Iterator[tuple[Coordinator, ServerThread]]:
    coordinator = make_coordinator(num_workers=1)
    with ServerThread(coordinator, port=0) as server:
        yield coordinator, server


def test_a_transport_on_the_host_moves_to_the_local_endpoint(
    served: tuple[Coordinator, ServerThread],
) -> None:
    coordinator, server = served
    q, k, v = qkv(8, seed=1)
    with (
        GrpcTransport(server.address, timeout=30) as local,
        GrpcTransport(server.address, timeout=30, local_endpoint=False) as remote,
    ):
        assert not local.on_local_endpoint  # nothing asked yet
        assert local.layout() == LAYOUT
        assert local.on_local_endpoint
        local._methods.clear()  # from now on a call that went over gRPC would fail
        mine = local.create_sequence(list(range(1, 9)))
        out = local.attend(0, [mine.seq_id], [8], q, k, v)
        assert local.get_sequence(mine.seq_id) == mine
        theirs = remote.create_sequence(list(range(1, 9)))
        reference = remote.attend(0, [theirs.seq_id], [8], q, k, v)
        assert not remote.on_local_endpoint
    assert torch.equal(out, reference)
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert coordinator.stats()["sequences_live"] == 2


def test_get_local_endpoint_answers_the_servers_address(
    served: tuple[Coordinator, ServerThread],
) -> None:
    server = served[1]
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.KVServiceStub(channel).GetLocalEndpoint(
            pb.GetLocalEndpointRequest(), timeout=10
        )
    assert reply.address == server.server.local_address
    assert reply.address.startswith("kvservice-")
    assert reply.version == VERSION


def test_a_server_without_a_local_endpoint_keeps_clients_on_grpc() -> None:
    with ServerThread(make_coordinator(), port=0, local_endpoint=False) as server:
        assert server.server.local_address is None
        with grpc.insecure_channel(server.address) as channel:
            reply = pb_grpc.KVServiceStub(channel).GetLocalEndpoint(
                pb.GetLocalEndpointRequest(), timeout=10
            )
        assert reply.address == "" and reply.version == 0
        with GrpcTransport(server.address, timeout=10) as client:
            info = client.create_sequence([1, 2, 3])
            assert client.get_sequence(info.seq_id) == info
            assert not client.on_local_endpoint

        async def run() -> bool:
            async with AsyncGrpcTransport(server.address, timeout=10) as c:
                assert await c.layout() == LAYOUT
                return c.on_local_endpoint

        assert asyncio.run(run()) is False


def test_an_endpoint_out_of_reach_leaves_the_client_on_grpc_without_asking_each_call(
    served: tuple[Coordinator, ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a client on another host: the name it is handed does not exist here."""
    server = served[1]
    monkeypatch.setattr(server.server._servicer, "local_address", "kvservice-elsewhere")
    asked: list[str] = []
    with GrpcTransport(server.address, timeout=10) as client:
        ask = client._methods["GetLocalEndpoint"]
        client._methods["GetLocalEndpoint"] = lambda *a, **kw: asked.append("ask") or ask(*a, **kw)
        info = client.create_sequence([1, 2, 3])
        for _ in range(3):
            assert client.get_sequence(info.seq_id) == info
        assert not client.on_local_endpoint
        assert asked == ["ask"]  # once, not before every call
        assert client._route.retry_at - time.monotonic() > 30


def test_the_environment_variable_keeps_default_transports_on_grpc(
    served: tuple[Coordinator, ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = served[1]
    monkeypatch.setenv(LOCAL_ENDPOINT_ENV, "0")
    with GrpcTransport(server.address, timeout=10) as client:
        assert client.layout() == LAYOUT
        assert not client.on_local_endpoint
    # An explicit choice wins over the environment.
    with GrpcTransport(server.address, timeout=10, local_endpoint=True) as client:
        assert client.layout() == LAYOUT
        assert client.on_local_endpoint


def test_errors_are_the_same_over_the_local_endpoint(
    served: tuple[Coordinator, ServerThread],
) -> None:
    coordinator, server = served
    info = coordinator.create_sequence([1, 2, 3, 4, 5])
    q, k, v = qkv(5, seed=2)
    wrong_q = torch.zeros(5, NUM_Q_HEADS, LAYOUT.head_dim // 2)
    calls: list[tuple[type[Exception], Callable[[GrpcTransport], object]]] = [
        (errors.NotFound, lambda c: c.get_sequence(123456)),
        (errors.NotFound, lambda c: c.free([123456])),
        (errors.InvalidArgument, lambda c: c.attend(0, [info.seq_id], [5], wrong_q, k, v)),
        (errors.InvalidArgument, lambda c: c.attend(0, [info.seq_id], [5], q, k[:, :1], v)),
        (errors.InvalidArgument, lambda c: c.create_sequence([])),
        (errors.FailedPrecondition, lambda c: c.attend(0, [info.seq_id], [5], q)),
        (errors.FailedPrecondition, lambda c: c.truncate(info.seq_id, 6)),
    ]
    before = coordinator.stats()["sequences_live"]
    with (
        GrpcTransport(server.address, timeout=30) as local,
        GrpcTransport(server.address, timeout=30, local_endpoint=False) as remote,
    ):
        local.layout()
        assert local.on_local_endpoint
        for expected, call in calls:
            with pytest.raises(expected) as over_local:
                call(local)
            with pytest.raises(expected) as over_grpc:
                call(remote)
            assert type(over_local.value) is type(over_grpc.value)
            assert str(over_local.value) == str(over_grpc.value)
        assert local.on_local_endpoint  # errors do not send a transport back to gRPC
        assert local.get_sequence(info.seq_id) == info
    assert coordinator.stats()["sequences_live"] == before
    coordinator.check_invariants()


def test_data_loss_carries_its_sequence_ids_over_the_local_endpoint() -> None:
    coordinator = make_coordinator(num_workers=1)
    with (
        ServerThread(coordinator, port=0) as server,
        GrpcTransport(server.address, timeout=30) as local,
        GrpcTransport(server.address, timeout=30, local_endpoint=False) as remote,
    ):
        seq_ids = sorted(local.create_sequence([i, i + 1]).seq_id for i in (1, 5))
        assert local.on_local_endpoint
        coordinator._handles[0].killed = True
        q, k, v = qkv(4, seed=3)
        with pytest.raises(errors.DataLoss) as lost:
            local.attend(0, seq_ids, [2, 2], q, k, v)
        assert lost.value.seq_ids == seq_ids
        with pytest.raises(errors.DataLoss) as over_local:
            local.get_sequence(seq_ids[1])
        with pytest.raises(errors.DataLoss) as over_grpc:
            remote.get_sequence(seq_ids[1])
        assert over_local.value.seq_ids == over_grpc.value.seq_ids == [seq_ids[1]]
        assert str(over_local.value) == str(over_grpc.value)


def test_the_local_endpoint_checks_tokens_itself() -> None:
    with ServerThread(make_coordinator(), port=0, tokens={"tok-a": "alice"}) as server:
        with GrpcTransport(server.address, token="tok-a", timeout=10) as alice:
            info = alice.create_sequence([1, 2, 3])
            assert alice.on_local_endpoint
            assert alice.get_sequence(info.seq_id, tenant="alice") == info
            with pytest.raises(errors.PermissionDenied, match="'bob'"):
                alice.create_sequence([1, 2, 3], tenant="bob")
        with GrpcTransport(server.address, token="tok-x", timeout=10) as stranger:
            with pytest.raises(errors.Unauthenticated, match="bearer token"):
                stranger.create_sequence([1, 2, 3])
            assert not stranger.on_local_endpoint  # GetLocalEndpoint was refused too

        address = server.server.local_address
        assert address is not None
        pool = LocalPool(address, max_message_bytes=MAX_MESSAGE_BYTES)
        try:
            request = pb.GetSequenceRequest(seq_id=info.seq_id)
            good = [("authorization", "Bearer tok-a")]
            assert raw_call(pool, "GetSequence", request, good).seq_id == info.seq_id
            refusals = [
                ([], grpc.StatusCode.UNAUTHENTICATED),
                ([("authorization", "Bearer tok-x")], grpc.StatusCode.UNAUTHENTICATED),
                ([("authorization", "tok-a")], grpc.StatusCode.UNAUTHENTICATED),
                ([*good, (TENANT_KEY, "bob")], grpc.StatusCode.PERMISSION_DENIED),
            ]
            for metadata, code in refusals:
                with pytest.raises(LocalRpcError) as refused:
                    raw_call(pool, "GetSequence", request, metadata)
                assert refused.value.code() == code, metadata
            # Refused before the request is parsed: a body that does not parse is not seen.
            with pytest.raises(LocalRpcError) as refused:
                raw_call(pool, "GetSequence", b"\xff\xff\xff")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # ... nor is the method's name: without a token even an unknown one is refused.
            with pytest.raises(LocalRpcError) as refused:
                raw_call(pool, "NoSuchMethod", request)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The connection survives refusals.
            assert raw_call(pool, "GetSequence", request, good).seq_id == info.seq_id
        finally:
            pool.close()


def test_raw_frames_that_are_not_calls_are_refused(
    served: tuple[Coordinator, ServerThread],
) -> None:
    coordinator, server = served
    address = server.server.local_address
    assert address is not None
    pool = LocalPool(address, max_message_bytes=MAX_MESSAGE_BYTES)
    try:
        assert raw_call(pool, "GetLayout", pb.GetLayoutRequest()).block_size == LAYOUT.block_size
        with pytest.raises(LocalRpcError) as unknown:
            raw_call(pool, "DropAllTables", pb.GetLayoutRequest())
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(LocalRpcError) as malformed:
            raw_call(pool, "GetSequence", b"\xff\xff\xff")
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in malformed.value.details()

        # Bytes that are not a frame: a head's worth, and more than the server reads
        # before it gives up (the unread rest turns the close into a reset).
        for garbage in (b"x" * REQUEST.size, b"x" * 64):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
                stranger.settimeout(5)
                stranger.connect(socket_name(address))
                stranger.sendall(garbage)
                try:
                    answer = stranger.recv(1024)
                except ConnectionResetError:
                    answer = b""
                assert answer == b""  # closed without a reply

        # The pool's connection (opened before) and a new one both still work.
        assert raw_call(pool, "GetLayout", pb.GetLayoutRequest()).num_layers == LAYOUT.num_layers
        info = coordinator.create_sequence([1, 2, 3])
        other = LocalPool(address, max_message_bytes=MAX_MESSAGE_BYTES)
        try:
            request = pb.GetSequenceRequest(seq_id=info.seq_id)
            assert raw_call(other, "GetSequence", request).length == 3
        finally:
            other.close()
    finally:
        pool.close()


def test_a_deadline_over_the_local_endpoint_is_deadline_exceeded() -> None:
    service = SlowService(make_coordinator(), stats=1.0)
    with ServerThread(service, port=0) as server:
        for local_endpoint in (True, False):
            with GrpcTransport(
                server.address, timeout=0.2, local_endpoint=local_endpoint
            ) as client:
                client.wait_ready(timeout=10)  # discovery below need not wait for a connection
                assert client.layout() == LAYOUT  # discovery is done
                assert client.on_local_endpoint is local_endpoint
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as late:
                    client.stats()
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - start < 0.8
                assert client.layout() == LAYOUT  # the transport carries on
                assert client.on_local_endpoint is local_endpoint


def test_a_sequence_created_for_a_client_that_went_away_is_freed() -> None:
    coordinator = make_coordinator()
    service = SlowService(coordinator, create_sequence=0.5)
    with (
        ServerThread(service, port=0) as server,
        GrpcTransport(server.address, timeout=0.1) as client,
    ):
        client.wait_ready(timeout=10)  # discovery below need not wait for a connection
        assert client.layout() == LAYOUT
        assert client.on_local_endpoint
        with pytest.raises(grpc.RpcError) as late:
            client.create_sequence([1, 2, 3, 4, 5])
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: len(service.results) == 1, timeout=3.0)  # it was made...
        made = service.results[0]
        # ... and freed, as the client was gone when it was.
        assert wait_for(lambda: coordinator.stats()["sequences_live"] == 0, timeout=1.5)
        with pytest.raises(errors.NotFound):
            coordinator.get_sequence(made.seq_id)
    coordinator.check_invariants()


def test_closing_a_transport_ends_its_calls_in_flight() -> None:
    """As closing a gRPC channel cancels its calls: the call fails at once, not when the
    server answers, on the sync and the asyncio transport alike."""
    service = SlowService(make_coordinator(), stats=3.0)
    with ServerThread(service, port=0) as server:
        client = GrpcTransport(server.address, timeout=30)
        assert client.layout() == LAYOUT and client.on_local_endpoint
        start = time.monotonic()
        caller, failures = call_on_a_thread(client.stats)
        assert service.started.wait(5)
        client.close()
        caller.join(5)
        assert not caller.is_alive() and time.monotonic() - start < 2.0
        assert len(failures) == 1 and isinstance(failures[0], errors.Unavailable), failures

        async def run() -> BaseException:
            async with AsyncGrpcTransport(server.address, timeout=30) as c:
                assert await c.layout() == LAYOUT and c.on_local_endpoint
                pending = asyncio.ensure_future(c.stats())
                await asyncio.sleep(0.3)
                await c.close()
                try:
                    await asyncio.wait_for(pending, 2.0)
                except BaseException as exc:  # checked below
                    return exc
                raise AssertionError("the call outlived its transport")

        assert isinstance(asyncio.run(run()), errors.Unavailable)


def test_stop_drains_calls_in_flight_then_closes_the_endpoint() -> None:
    service = SlowService(make_coordinator(), stats=0.5)
    server = ServerThread(service, port=0)
    address = server.server.local_address
    assert address is not None
    client = GrpcTransport(server.address, timeout=10)
    bystander = LocalPool(address, max_message_bytes=MAX_MESSAGE_BYTES)
    try:
        assert client.layout() == LAYOUT
        assert client.on_local_endpoint
        bystander.open()  # a connection that is idle when the drain starts
        caller, outcome = call_on_a_thread(client.stats)
        assert service.started.wait(5)
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 5})
        stopper.start()

        # New calls are refused while the call in flight finishes.
        def refused() -> bool:
            try:
                raw_call(bystander, "GetLayout", pb.GetLayoutRequest())
            except LocalRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert "stopping" in exc.details()
                return True
            return False

        assert wait_for(refused, timeout=2.0)
        assert caller.is_alive()  # still in flight when the refusal came
        caller.join(10)
        stopper.join(10)
        assert not stopper.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
        assert outcome[0]["sequences_live"] == 0

        # The endpoint is gone: nothing listens on its address any more.
        late = LocalPool(address, max_message_bytes=MAX_MESSAGE_BYTES)
        with pytest.raises(EndpointUnreachable):
            raw_call(late, "GetLayout", pb.GetLayoutRequest())
        # The transport falls back to gRPC, which is stopped as well.
        with pytest.raises(errors.Unavailable):
            client.layout()
        assert not client.on_local_endpoint
    finally:
        bystander.close()
        client.close()
        server.stop(grace=0)


def test_stop_without_grace_ends_calls_in_flight_at_once_on_both_paths() -> None:
    for local_endpoint in (False, True):
        service = SlowService(make_coordinator(), stats=1.0)
        server = ServerThread(service, port=0)
        client = GrpcTransport(server.address, timeout=10, local_endpoint=local_endpoint)
        try:
            assert client.layout() == LAYOUT
            assert client.on_local_endpoint is local_endpoint
            caller, outcome = call_on_a_thread(client.stats)
            assert service.started.wait(5)
            start = time.monotonic()
            server.stop(grace=None)
            took = time.monotonic() - start
            caller.join(10)
            assert took < 0.5, f"local_endpoint={local_endpoint}: stop took {took:.2f} s"
            assert len(outcome) == 1 and isinstance(outcome[0], errors.Unavailable), outcome
        finally:
            client.close()
            server.stop(grace=0)


def test_the_asyncio_transport_uses_the_local_endpoint_concurrently(
    served: tuple[Coordinator, ServerThread],
) -> None:
    coordinator, server = served
    q, k, v = qkv(8, seed=4)
    info = coordinator.create_sequence(list(range(1, 9)))
    coordinator.attend(0, [info.seq_id], [8], q, k, v)
    queries = [qkv(1, seed=10 + i)[0] for i in range(8)]

    async def run() -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        async with AsyncGrpcTransport(server.address, timeout=30) as c:
            assert await c.layout() == LAYOUT
            on_local = c.on_local_endpoint
            c._methods.clear()  # from now on a call that went over gRPC would fail
            together = await asyncio.gather(
                *(c.attend(0, [info.seq_id], [1], query) for query in queries)
            )
            one_by_one = [await c.attend(0, [info.seq_id], [1], query) for query in queries]
            with pytest.raises(errors.NotFound):
                await c.get_sequence(info.seq_id + 1000)
            return list(together), one_by_one, on_local

    together, one_by_one, on_local = asyncio.run(run())
    assert on_local
    for query, got, want in zip(queries, together, one_by_one, strict=True):
        assert torch.equal(got, want)
        # q is for the last position, so it sees every key
        expected = dense_attention(query, k, v)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
