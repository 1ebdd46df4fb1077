"""The service API over real gRPC on 127.0.0.1: a real coordinator with embedded CPU workers.

Every call made through the client must give exactly what the same call gives in
process, errors must arrive as the same exception classes, and a failed call must leave
the service as it was.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from service_fixtures import LAYOUT, NUM_Q_HEADS, dense_attention, make_coordinator

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.core.layout import Layout
from kvservice.grpc_client import AsyncGrpcTransport, GrpcTransport
from kvservice.server import ServerThread
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.v1 import kvservice_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def qkv(
    num_rows: int, seed: int, layout: Layout = LAYOUT, num_q_heads: int = NUM_Q_HEADS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    kv_shape = (num_rows, layout.num_kv_heads, layout.head_dim)
    q = torch.randn(num_rows, num_q_heads, layout.head_dim, generator=gen)
    k, v = torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def served() -> Iterator[tuple[Coordinator, ServerThread]]:
    coordinator = make_coordinator(num_workers=2)
    with ServerThread(coordinator, port=0) as server:
        yield coordinator, server


@pytest.fixture(params=[True, False], ids=["local-endpoint", "grpc-only"])
def client(
    served: tuple[Coordinator, ServerThread], request: pytest.FixtureRequest
) -> Iterator[GrpcTransport]:
    """A client of each path: the server's local endpoint, or gRPC for every call."""
    with GrpcTransport(served[1].address, timeout=30, local_endpoint=request.param) as c:
        c.layout()  # the first call: a local client finds the endpoint here
        assert c.on_local_endpoint == request.param
        yield c


def _workload(service: object) -> list[object]:
    """A generation-shaped script of calls; returns everything the service answered."""
    s = service
    seen: list[object] = [s.layout()]
    prompt = list(range(1, 11))
    info = s.create_sequence(prompt)
    seen.append(info)
    q, k, v = qkv(10, seed=1)
    for layer in range(LAYOUT.num_layers):
        seen.append(s.attend(layer, [info.seq_id], [10], q, k, v))
    s.append_tokens([info.seq_id], [[11]])
    for layer in range(LAYOUT.num_layers):
        s.write_kv(layer, [info.seq_id], [1], *qkv(1, seed=2 + layer)[1:])
    children = s.fork(info.seq_id, 2)
    seen.append(children)
    s.append_tokens(children, [[12, 13], [14]])
    q1, k1, v1 = qkv(4, seed=4)
    out, lse = s.attend(
        1, [info.seq_id, *children], [1, 2, 1], q1, k1, v1, return_lse=True, scale=0.3
    )
    seen += [out, lse]
    q2, k2, v2 = qkv(1, seed=5)
    seen.append(s.attend(0, [children[1]], [1], q2, k2, v2, sliding_window=3))
    s.truncate(children[0], 9)
    seen += [s.get_sequence(sid) for sid in (info.seq_id, *children)]
    s.offload([children[1]])
    seen.append(s.get_sequence(children[1]))
    s.prefetch([children[1]])
    seen.append(s.lookup_prefix(prompt))
    s.free([info.seq_id, *children])
    again = s.create_sequence(prompt + [99])
    seen += [again, s.lookup_prefix(prompt, tenant="other")]
    return seen


def test_every_call_gives_what_the_embedded_service_gives(client: GrpcTransport) -> None:
    remote = _workload(client)
    local = _workload(make_coordinator(num_workers=2))
    assert len(remote) == len(local)
    for got, want in zip(remote, local, strict=True):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            assert got == want
    # The answers mean something: the prefill matches plain attention, the prompt's
    # full blocks were cached by its first run and found by the second.
    q, k, v = qkv(10, seed=1)
    torch.testing.assert_close(remote[2], dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
    again, other_tenant = remote[-2], remote[-1]
    assert again.num_cached_tokens == 8 and other_tenant == {}


def test_stats_and_layout(client: GrpcTransport, served: tuple[Coordinator, ServerThread]) -> None:
    assert client.layout() == LAYOUT
    client.create_sequence([1, 2, 3])
    stats = client.stats()
    assert stats["sequences_live"] == 1
    assert stats["layout"]["block_bytes"] == LAYOUT.block_bytes
    assert set(stats["workers"]) == {"0", "1"}


def test_tenants_only_see_their_own_sequences(client: GrpcTransport) -> None:
    mine = client.create_sequence([1, 2, 3], tenant="alice")
    assert client.get_sequence(mine.seq_id, tenant="alice") == mine
    with pytest.raises(errors.NotFound, match=f"sequence {mine.seq_id} not found"):
        client.get_sequence(mine.seq_id, tenant="bob")
    with pytest.raises(errors.NotFound):
        client.free([mine.seq_id])  # the default tenant is not alice either


def test_errors_arrive_as_the_same_classes_and_change_nothing(
    client: GrpcTransport, served: tuple[Coordinator, ServerThread]
) -> None:
    coordinator = served[0]
    info = client.create_sequence([1, 2, 3, 4, 5])
    before = coordinator.stats()
    q, k, v = qkv(5, seed=0)
    with pytest.raises(errors.NotFound):
        client.get_sequence(123456)
    with pytest.raises(errors.InvalidArgument, match="k_new"):
        client.attend(0, [info.seq_id], [5], q, k[:, :1], v)
    with pytest.raises(errors.InvalidArgument):
        client.create_sequence([])
    with pytest.raises(errors.InvalidArgument):
        client.create_sequence([1, -2])
    with pytest.raises(errors.InvalidArgument):
        client.attend(LAYOUT.num_layers, [info.seq_id], [5], q, k, v)
    with pytest.raises(errors.FailedPrecondition, match="no K/V"):
        client.attend(0, [info.seq_id], [5], q)
    with pytest.raises(errors.FailedPrecondition):
        client.truncate(info.seq_id, 6)
    capacity = 2 * (64 + 64) * LAYOUT.block_size
    with pytest.raises(errors.ResourceExhausted):
        client.create_sequence(list(range(capacity + 1)))
    after = coordinator.stats()
    assert after["sequences_live"] == before["sequences_live"] == 1
    for worker_id, worker in before["workers"].items():
        assert after["workers"][worker_id]["tiers"] == worker["tiers"]
    assert client.get_sequence(info.seq_id) == info
    coordinator.check_invariants()


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (pb.Tensor(dtype="float32", shape=[5, NUM_Q_HEADS, 16], data=b"\0" * 7), "q: 7 bytes"),
        (pb.Tensor(dtype="qfloat", shape=[1], data=b"\0"), "q: unknown dtype 'qfloat'"),
        (pb.Tensor(dtype="float32", shape=[-5, 4], data=b""), "q: bad shape"),
        (pb.Tensor(dtype="float32", shape=[2**40, 2**40], data=b""), "q: 0 bytes"),
    ],
)
def test_malformed_tensors_are_invalid_argument(
    served: tuple[Coordinator, ServerThread], tensor: pb.Tensor, match: str
) -> None:
    coordinator, server = served
    seq_id = coordinator.create_sequence([1, 2, 3, 4, 5]).seq_id
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.KVServiceStub(channel)
        request = pb.AttendRequest(layer=0, seq_ids=[seq_id], q_lens=[5], q=tensor)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Attend(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in failure.value.details()


def test_a_lost_worker_is_data_loss_naming_its_sequences(
    client: GrpcTransport, served: tuple[Coordinator, ServerThread]
) -> None:
    coordinator = served[0]
    infos = [client.create_sequence([i, i + 1, i + 2]) for i in range(1, 9)]
    on_0 = sorted(i.seq_id for i in infos if i.worker_id == 0)
    on_1 = [i for i in infos if i.worker_id == 1]
    assert on_0 and on_1, "placement should use both workers"
    coordinator._handles[0].killed = True
    q, k, v = qkv(3 * len(infos), seed=5)
    with pytest.raises(errors.DataLoss) as lost:
        client.attend(0, [i.seq_id for i in infos], [3] * len(infos), q, k, v)
    assert lost.value.seq_ids == on_0
    assert "worker 0" in str(lost.value)
    # Worker 1's sequences carry on.
    q1, k1, v1 = qkv(3, seed=6)
    out = client.attend(0, [on_1[0].seq_id], [3], q1, k1, v1)
    assert out.shape == (3, NUM_Q_HEADS, LAYOUT.head_dim)
    # A lost sequence stays DATA_LOSS until its owner frees it.
    with pytest.raises(errors.DataLoss) as again:
        client.get_sequence(on_0[0])
    assert again.value.seq_ids == [on_0[0]]
    client.free(on_0)
    with pytest.raises(errors.NotFound):
        client.get_sequence(on_0[0])


def test_payloads_beyond_grpcs_default_4_mib_limit() -> None:
    layout = Layout(num_layers=1, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
    coordinator = make_coordinator(layout, num_workers=1, num_gpu_blocks=32, num_cpu_blocks=8)
    num_rows, num_q_heads = 320, 64  # q alone: 320 * 64 * 128 * 2 bytes = 5 MiB
    q, k, v = qkv(num_rows, seed=7, layout=layout, num_q_heads=num_q_heads)
    assert q.numel() * q.element_size() > 4 * 2**20
    with ServerThread(coordinator, port=0) as server, GrpcTransport(server.address) as c:
        info = c.create_sequence(list(range(num_rows)))
        out = c.attend(0, [info.seq_id], [num_rows], q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_attention(q, k, v), rtol=2e-2, atol=2e-2)


def test_many_clients_at_once(served: tuple[Coordinator, ServerThread]) -> None:
    coordinator, server = served
    results: list[torch.Tensor] = []
    failures: list[BaseException] = []

    def one_client() -> None:
        try:
            with GrpcTransport(server.address, timeout=60) as c:
                info = c.create_sequence(list(range(1, 8)))
                q, k, v = qkv(7, seed=8)
                for layer in range(LAYOUT.num_layers):
                    out = c.attend(layer, [info.seq_id], [7], q, k, v)
                for step in range(3):
                    c.append_tokens([info.seq_id], [[20 + step]])
                    qs, ks, vs = qkv(1, seed=9 + step)
                    for layer in range(LAYOUT.num_layers):
                        out = c.attend(layer, [info.seq_id], [1], qs, ks, vs)
                results.append(out)
                c.free([info.seq_id])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=one_client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(results) == 8 and all(torch.equal(r, results[0]) for r in results)
    assert coordinator.stats()["sequences_live"] == 0
    coordinator.check_invariants()


def test_asyncio_client(served: tuple[Coordinator, ServerThread]) -> None:
    coordinator, server = served

    async def run() -> tuple[torch.Tensor, list[int]]:
        async with AsyncGrpcTransport(server.address, timeout=30) as c:
            await c.wait_ready(timeout=10)
            assert await c.layout() == LAYOUT
            info = await c.create_sequence(list(range(1, 7)), tenant="carol")
            q, k, v = qkv(6, seed=10)
            outs = await asyncio.gather(
                *(c.attend(layer, [info.seq_id], [6], q, k, v, tenant="carol")
                  for layer in range(LAYOUT.num_layers))
            )
            with pytest.raises(errors.NotFound):
                await c.get_sequence(info.seq_id)
            children = await c.fork(info.seq_id, 2, tenant="carol")
            await c.free([info.seq_id, *children], tenant="carol")
            return outs[0], children

    out, children = asyncio.run(run())
    q, k, v = qkv(6, seed=10)
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(children) == 2
    assert coordinator.stats()["sequences_live"] == 0
