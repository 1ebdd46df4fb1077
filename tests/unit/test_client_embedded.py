"""Client and AsyncClient over the embedded transport: construction, tenants, the API."""

from __future__ import annotations

import asyncio

import pytest
import torch
from service_fixtures import ATOL, LAYOUT, Shadow

import kvservice
from kvservice import AsyncClient, Client, Layout
from kvservice.coordinator import Coordinator


def make_client(**options: object) -> Client:
    return Client.embedded(LAYOUT, device="cpu", num_gpu_blocks=32, num_cpu_blocks=32, **options)


def test_embedded_client_runs_a_sequence_end_to_end() -> None:
    shadow = Shadow()
    with make_client() as client:
        assert isinstance(client.service, Coordinator)
        assert client.layout == LAYOUT
        info = client.create_sequence(list(range(6)))
        shadow.prefill(client, info.seq_id, 6, 0)
        client.append_tokens([info.seq_id], [[9]])
        for layer in range(LAYOUT.num_layers):
            out, expected = shadow.attend(client, layer, [info.seq_id], [1], [7])
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
        (child,) = client.fork(info.seq_id, 1)
        client.truncate(child, 3)
        assert client.get_sequence(child).length == 3
        client.free([info.seq_id, child])
        stats = client.stats()
        assert stats["sequences_live"] == 0
        assert stats["layout"]["block_size"] == LAYOUT.block_size
    with pytest.raises(kvservice.Unavailable):
        client.create_sequence([1])


def test_layout_by_name_and_block_size() -> None:
    client = Client.embedded("tiny", block_size=8, device="cpu", num_gpu_blocks=4)
    assert client.layout == Layout(2, 2, 16, "float32", 8)
    with pytest.raises(ValueError, match="unknown layout"):
        Client.embedded("no-such-layout", device="cpu")


def test_client_tenant_is_the_default_for_every_call() -> None:
    coordinator = make_client().service
    alice = Client(coordinator, tenant="alice")
    bob = Client(coordinator, tenant="bob")
    info = alice.create_sequence([1, 2, 3])
    assert alice.get_sequence(info.seq_id).length == 3
    with pytest.raises(kvservice.NotFound):
        bob.get_sequence(info.seq_id)
    # An explicit tenant wins over the client's.
    assert bob.get_sequence(info.seq_id, tenant="alice").seq_id == info.seq_id
    assert coordinator.stats()["sequences_by_tenant"] == {"alice": 1}


def test_async_client_runs_tasks_concurrently() -> None:
    async def main() -> None:
        client = AsyncClient.embedded(LAYOUT, device="cpu", num_gpu_blocks=32)
        assert await client.layout() == LAYOUT

        async def one(i: int) -> int:
            info = await client.create_sequence([i] * 5)
            q = torch.randn(5, 4, 16)
            k = torch.randn(5, 2, 16)
            out = await client.attend(0, [info.seq_id], [5], q, k, torch.randn(5, 2, 16))
            assert out.shape == (5, 4, 16)
            await client.free([info.seq_id])
            return info.seq_id

        ids = await asyncio.gather(*(one(i) for i in range(8)))
        assert len(set(ids)) == 8
        assert (await client.stats())["sequences_live"] == 0
        with pytest.raises(kvservice.NotFound):
            await client.get_sequence(ids[0])
        await client.close()

    asyncio.run(main())
