"""One suite, three transports: embedded, Ray (coordinator actor + worker actors) and gRPC
on 127.0.0.1, the latter both ways a client on the server's host can take (its calls over
the server's local endpoint, or over gRPC only). Every test runs against each and must see
the same results and errors."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest
import torch
from service_fixtures import ATOL, LAYOUT, NUM_Q_HEADS, Shadow, dense_attention

import kvservice
from kvservice import AsyncClient, Client
from kvservice.core.ids import Tier

pytestmark = pytest.mark.integration

TRANSPORTS = ("embedded", "ray", "grpc", "grpc-local")
# Small device tier (swapping happens), two workers (batches split across them).
POOLS = {"num_workers": 2, "num_gpu_blocks": 24, "num_cpu_blocks": 96}


def close(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


class Served:
    """A running service for one transport, and how to make clients of it."""

    def __init__(self, transport: str, request: pytest.FixtureRequest) -> None:
        self.transport = transport
        self._stop: list = []
        if transport == "embedded":
            self.client = Client.embedded(LAYOUT, device="cpu", **POOLS)
            self._coordinator = self.client.service
        elif transport == "ray":
            request.getfixturevalue("ray_cluster")
            self.name = f"kvservice-test-{uuid.uuid4().hex[:8]}"
            self.client = Client.ray(LAYOUT, name=self.name, use_gpu=False, **POOLS)
        else:
            from kvservice.server import ServerThread
            from kvservice.transport_embedded import build_embedded

            self._coordinator = build_embedded(LAYOUT, device="cpu", **POOLS)
            self.server = ServerThread(self._coordinator, host="127.0.0.1", port=0)
            self._stop.append(self.server.stop)
            self._grpc = {"timeout": 60, "local_endpoint": transport == "grpc-local"}
            self.client = Client.grpc(self.server.address, **self._grpc)
            assert self.client.layout == LAYOUT  # the first call: a local client finds its endpoint
            assert self.client.service.on_local_endpoint == self._grpc["local_endpoint"]

    def new_client(self, tenant: str | None = None) -> Client:
        if self.transport == "embedded":
            return Client(self._coordinator, tenant=tenant)
        if self.transport == "ray":
            return Client.ray(name=self.name, tenant=tenant)
        return Client.grpc(self.server.address, tenant=tenant, **self._grpc)

    def async_client(self) -> AsyncClient:
        if self.transport == "embedded":
            return AsyncClient(self._coordinator)
        if self.transport == "ray":
            return AsyncClient.ray(name=self.name)
        return AsyncClient.grpc(self.server.address, **self._grpc)

    def stop(self) -> None:
        self.client.close()
        for stop in self._stop:
            stop()


@pytest.fixture(scope="module", params=TRANSPORTS)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    service = Served(request.param, request)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    yield served.client
    # Each test frees what it made: the next one starts from an empty service.
    assert served.client.stats()["sequences_live"] == 0


def test_layout_and_stats(client: Client) -> None:
    assert client.layout == LAYOUT
    stats = client.stats()
    assert stats["layout"]["num_layers"] == LAYOUT.num_layers
    assert sorted(stats["workers"]) == ["0", "1"]
    assert stats["workers"]["0"]["tiers"]["gpu"]["total"] == POOLS["num_gpu_blocks"]
    assert stats["workers"]["0"]["tiers"]["cpu"]["total"] == POOLS["num_cpu_blocks"]


def test_generation_matches_dense_attention(client: Client) -> None:
    shadow = Shadow(seed=1)
    prompts = [list(range(3 + 2 * i)) for i in range(4)]
    infos = [client.create_sequence(p) for p in prompts]
    assert {i.worker_id for i in infos} == {0, 1}
    ids = [i.seq_id for i in infos]
    lengths = [len(p) for p in prompts]
    for layer in range(LAYOUT.num_layers):  # one batched prefill over both workers
        close(*shadow.attend(client, layer, ids, lengths, lengths))
    for step in range(5):
        client.append_tokens(ids, [[step]] * len(ids))
        lengths = [n + 1 for n in lengths]
        for layer in range(LAYOUT.num_layers):
            out, expected = shadow.attend(client, layer, ids, [1] * len(ids), lengths)
            assert out.shape == (len(ids), NUM_Q_HEADS, LAYOUT.head_dim)
            close(out, expected)
    for sid, length in zip(ids, lengths, strict=True):
        info = client.get_sequence(sid)
        assert (info.length, info.num_cached_tokens) == (length, length)
        assert len(info.tiers) == info.num_blocks == LAYOUT.num_blocks_for(length)
    client.free(ids)


class _Through:
    """``Shadow.attend`` through a step ticket."""

    def __init__(self, ticket: object) -> None:
        self.ticket = ticket

    def attend(
        self, layer: int, seq_ids: object, q_lens: object, q: object, k: object, v: object
    ) -> object:
        return self.ticket.attend(layer, q, k, v)  # type: ignore[attr-defined]


def test_step_tickets_where_the_client_reaches_the_workers(served: Served, client: Client) -> None:
    shadow = Shadow(seed=3)
    prompts = [list(range(50, 55 + 3 * i)) for i in range(4)]
    ids = [client.create_sequence(p).seq_id for p in prompts]
    lengths = [len(p) for p in prompts]
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(client, layer, ids, lengths, lengths))
    client.append_tokens(ids, [[9]] * len(ids))
    lengths = [n + 1 for n in lengths]
    if served.transport.startswith("grpc"):
        with pytest.raises(kvservice.errors.InvalidArgument, match="embedded or Ray"):
            client.open_ticket(ids, [1] * len(ids))
        client.free(ids)
        return
    ticket = client.open_ticket(ids, [1] * len(ids))
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(_Through(ticket), layer, ids, [1] * len(ids), lengths))
    client.close_ticket(ticket.ticket_id)
    # Recorded: the service's own path reads what the ticket wrote.
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(client, layer, ids, [1] * len(ids), lengths, write=False))
    client.free(ids)


def test_write_kv_and_lse(client: Client) -> None:
    shadow = Shadow(seed=2)
    info = client.create_sequence(list(range(6)))
    k, v = shadow.randn(6, 2, 16), shadow.randn(6, 2, 16)
    for layer in range(LAYOUT.num_layers):
        client.write_kv(layer, [info.seq_id], [6], k, v)
        shadow.kv[(info.seq_id, layer)] = {p: (k[p], v[p]) for p in range(6)}
    close(*shadow.attend(client, 1, [info.seq_id], [2], [6], write=False))
    q = shadow.randn(1, NUM_Q_HEADS, 16)
    out, lse = client.attend(0, [info.seq_id], [1], q, return_lse=True, scale=0.5)
    assert out.shape == (1, NUM_Q_HEADS, 16) and lse.shape == (1, NUM_Q_HEADS)
    assert lse.dtype == torch.float32 and torch.isfinite(lse).all()
    client.free([info.seq_id])


def test_prefix_reuse_fork_and_truncate(client: Client) -> None:
    shadow = Shadow(seed=3)
    prompt = list(range(200, 210))
    a = client.create_sequence(prompt)
    shadow.prefill(client, a.seq_id, 10, 0)
    assert client.lookup_prefix(prompt) == {a.worker_id: 8}
    b = client.create_sequence(prompt + [1, 2])
    assert (b.num_cached_tokens, b.worker_id) == (8, a.worker_id)
    shadow.share(a.seq_id, b.seq_id, 8)
    shadow.prefill(client, b.seq_id, 12, 8)
    children = client.fork(b.seq_id, 2)
    shadow.fork(b.seq_id, children)
    client.truncate(children[1], 9)
    shadow.truncate(children[1], 9)
    client.append_tokens(children, [[5], [6, 7]])
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(client, layer, children, [1, 2], [13, 11]))
    close(*shadow.attend(client, 0, [b.seq_id], [12], [12], write=False))
    client.free([a.seq_id, b.seq_id, *children])


def test_swapping_under_a_small_device_tier(client: Client) -> None:
    shadow = Shadow(seed=4)
    infos = []
    for i in range(6):  # 6 x 4 blocks over 2 workers of 24: more than fits beside the cache
        info = client.create_sequence([1000 + i] * 16)
        shadow.prefill(client, info.seq_id, 16, 0)
        infos.append(info)
    client.offload([infos[0].seq_id])
    assert set(client.get_sequence(infos[0].seq_id).tiers) == {Tier.CPU}
    client.prefetch([infos[0].seq_id])
    for info in infos:
        close(*shadow.attend(client, 1, [info.seq_id], [3], [16], write=False))
    assert client.stats()["swaps"]["out"]["blocks"] > 0
    client.free([i.seq_id for i in infos])


def test_errors_are_the_same_classes_and_change_nothing(client: Client) -> None:
    info = client.create_sequence([1, 2, 3])
    before = client.get_sequence(info.seq_id)
    z = torch.zeros
    with pytest.raises(kvservice.NotFound):
        client.get_sequence(10**9)
    with pytest.raises(kvservice.InvalidArgument):
        client.attend(0, [info.seq_id], [1], z(1, 3, 16), z(1, 2, 16), z(1, 2, 16))
    with pytest.raises(kvservice.InvalidArgument):
        client.create_sequence([-1])
    with pytest.raises(kvservice.FailedPrecondition):
        client.truncate(info.seq_id, 4)
    with pytest.raises(kvservice.FailedPrecondition):
        client.attend(0, [info.seq_id], [1], z(1, 4, 16))  # no K/V written yet
    with pytest.raises(kvservice.ResourceExhausted):
        client.create_sequence([7] * (LAYOUT.block_size * 1000))
    with pytest.raises(kvservice.ResourceExhausted):
        client.append_tokens([info.seq_id], [[7] * (LAYOUT.block_size * 1000)])
    assert client.get_sequence(info.seq_id) == before
    client.free([info.seq_id])
    with pytest.raises(kvservice.NotFound):
        client.free([info.seq_id])


def test_tenants(served: Served, client: Client) -> None:
    alice = served.new_client(tenant="alice")
    bob = served.new_client(tenant="bob")
    try:
        mine = alice.create_sequence([4, 5, 6])
        with pytest.raises(kvservice.NotFound):
            bob.get_sequence(mine.seq_id)
        with pytest.raises(kvservice.NotFound):
            bob.free([mine.seq_id])
        assert alice.get_sequence(mine.seq_id).length == 3
        alice.free([mine.seq_id])
    finally:
        alice.close()
        bob.close()


def test_concurrent_clients(served: Served, client: Client) -> None:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            shadow = Shadow(seed=100 + index)
            info = client.create_sequence([index] * (5 + index))
            shadow.prefill(client, info.seq_id, info.length, 0)
            length = info.length
            for step in range(3):
                client.append_tokens([info.seq_id], [[step]])
                length += 1
                for layer in range(LAYOUT.num_layers):
                    close(*shadow.attend(client, layer, [info.seq_id], [1], [length]))
            client.free([info.seq_id])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_async_client(served: Served, client: Client) -> None:
    async def main() -> None:
        aclient = served.async_client()
        try:
            assert await aclient.layout() == LAYOUT

            async def one(i: int) -> None:
                info = await aclient.create_sequence([i + 1] * 4)
                shadow = Shadow(seed=200 + i)
                q = shadow.randn(4, NUM_Q_HEADS, 16)
                k, v = shadow.randn(4, 2, 16), shadow.randn(4, 2, 16)
                out = await aclient.attend(0, [info.seq_id], [4], q, k, v)
                close(out, dense_attention(q, k, v))
                await aclient.free([info.seq_id])

            await asyncio.gather(*(one(i) for i in range(4)))
            with pytest.raises(kvservice.NotFound):
                await aclient.get_sequence(10**9)
        finally:
            await aclient.close()

    asyncio.run(main())
