"""The worker on a CUDA device: Triton kernels, a pinned host tier, swaps on their own
stream ordered against the compute stream. Skipped without CUDA."""

from __future__ import annotations

import kvservice.kernels as kernels
import pytest
import torch
from kvservice.workers import AttendPlan, Worker

from kvservice.core.ids import Tier
from kvservice.core.layout import Layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
BF16_TOL = 2e-2


def cuda_worker() -> Worker:
    return Worker(0, LAYOUT, device="cuda", num_gpu_blocks=64, num_cpu_blocks=16)


def kv(num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    shape = (num_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def test_pools_live_on_the_device_and_the_host_tier_is_pinned() -> None:
    worker = cuda_worker()
    assert worker.gpu_pool.is_cuda and worker.gpu_pool.dtype == torch.bfloat16
    assert worker.cpu_pool.is_pinned()
    assert worker.info().device.startswith("cuda:")


@pytest.mark.parametrize("q_on_device", [False, True])
def test_fused_decode_matches_the_reference_and_returns_on_q_device(q_on_device: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    worker = cuda_worker()
    tables = [[3, 9, 4], [20, 21]]
    seq_lens = [40, 17]
    for table, length in zip(tables, seq_lens, strict=True):
        slots = torch.tensor([table[p // 16] * 16 + p % 16 for p in range(length - 1)])
        worker.write_kv(1, slots, kv(length - 1, gen), kv(length - 1, gen))
    q = torch.randn(2, 8, LAYOUT.head_dim, generator=gen).to(torch.bfloat16)
    k_new, v_new = kv(2, gen), kv(2, gen)
    if q_on_device:
        q, k_new, v_new = q.cuda(), k_new.cuda(), v_new.cuda()
    plan = AttendPlan(tables, seq_lens, [1, 1])

    out, lse = worker.attend(1, plan, q, k_new, v_new, return_lse=True)

    assert out.device == q.device and lse.device == q.device
    pool = worker.export_blocks(Tier.GPU, list(range(64)))
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    want_out, want_lse = kernels.paged_decode_ref(
        q.cpu(), pool[:, 1, 0], pool[:, 1, 1], padded,
        torch.tensor(seq_lens, dtype=torch.int32), return_lse=True,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().float(), want_out.float(), atol=BF16_TOL, rtol=BF16_TOL)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=BF16_TOL, rtol=BF16_TOL)
    assert worker.stats()["kernel_time"]["paged_decode"]["seconds"] > 0


def test_swaps_are_ordered_against_compute_without_explicit_waits() -> None:
    gen = torch.Generator().manual_seed(1)
    worker = cuda_worker()
    data = torch.randn(4, *LAYOUT.block_shape, generator=gen).to(torch.bfloat16)
    worker.import_blocks(Tier.GPU, [0, 1, 2, 3], data)
    worker.swap_out([(0, 5), (1, 6), (2, 7), (3, 8)])
    # the freed device blocks are reused at once: the host copies must keep the old bytes
    worker.import_blocks(Tier.GPU, [0, 1, 2, 3], torch.zeros_like(data))
    worker.swap_in([(5, 40), (6, 41), (7, 42), (8, 43)])
    worker.copy_blocks([(40, 50), (41, 51), (42, 52), (43, 53)])
    assert torch.equal(worker.export_blocks(Tier.GPU, [50, 51, 52, 53]), data)
    assert torch.equal(worker.export_blocks(Tier.CPU, [5, 6, 7, 8]), data)
    assert torch.count_nonzero(worker.export_blocks(Tier.GPU, [0, 1, 2, 3])) == 0
    stats = worker.stats()
    assert stats["bytes_swapped"]["gpu_to_cpu"] == 4 * LAYOUT.block_bytes
    assert stats["kernel_time"]["swap_gpu_to_cpu"]["seconds"] > 0


@pytest.mark.parametrize("graphs", [0, 4])
def test_calls_queued_before_any_wait_give_each_its_own_output(graphs: int) -> None:
    # attend_to_host returns before the device is done: several calls queued back to back
    # (host inputs staged through pinned memory, outputs copied into pinned memory) must
    # each give exactly what attend gives, whatever order they are waited for in; with
    # decode graphs the last three replay one graph, whose output buffer each overwrites.
    gen = torch.Generator().manual_seed(3)
    worker = Worker(
        0, LAYOUT, device="cuda", num_gpu_blocks=64, num_cpu_blocks=16, decode_graphs=graphs
    )
    tables = [[3, 9, 4], [20, 21]]
    seq_lens = [40, 17]
    for table, length in zip(tables, seq_lens, strict=True):
        slots = torch.tensor([table[p // 16] * 16 + p % 16 for p in range(length)])
        worker.write_kv(0, slots, kv(length, gen), kv(length, gen))
    plan = AttendPlan(tables, seq_lens, [1, 1])
    qs = [torch.randn(2, 8, LAYOUT.head_dim, generator=gen).to(torch.bfloat16) for _ in range(6)]
    pending = [worker.attend_to_host(0, plan, q) for q in qs]
    for q, result in reversed(list(zip(qs, pending, strict=True))):
        out = result.wait()
        assert out.device.type == "cpu" and out.is_pinned()
        assert torch.equal(out, worker.attend(0, plan, q))


def test_decode_graphs_replay_each_calls_tables_and_writes() -> None:
    # Calls returning through pinned memory replay a CUDA graph per key (layer, shapes,
    # scale, writes): the tables' contents and the new K/V change from call to call and the
    # outputs must match a worker without graphs, call by call, including what was written.
    gen = torch.Generator().manual_seed(4)
    graphed = Worker(
        0, LAYOUT, device="cuda", num_gpu_blocks=64, num_cpu_blocks=16, decode_graphs=4
    )
    plain = Worker(1, LAYOUT, device="cuda", num_gpu_blocks=64, num_cpu_blocks=16)
    data = torch.randn(64, *LAYOUT.block_shape, generator=gen).to(torch.bfloat16)
    for worker in (graphed, plain):
        worker.import_blocks(Tier.GPU, list(range(64)), data)
    plans = [
        AttendPlan([[3, 9, 4], [20, 21]], [40, 17], [1, 1], new_slots=[4 * 16 + 7, 21 * 16]),
        AttendPlan([[5, 6, 7], [30, 31, 32]], [33, 48], [1, 1], new_slots=[7 * 16, 32 * 16 + 15]),
        AttendPlan([[10, 11], [12, 13]], [20, 31], [1, 1], new_slots=[11 * 16 + 3, 13 * 16 + 14]),
    ]
    for step in range(7):
        plan = plans[step % 3]
        q = torch.randn(2, 8, LAYOUT.head_dim, generator=gen).to(torch.bfloat16)
        k_new, v_new = kv(2, gen), kv(2, gen)
        got = graphed.attend_to_host(1, plan, q, k_new, v_new, return_lse=True).wait()
        want = plain.attend_to_host(1, plan, q, k_new, v_new, return_lse=True).wait()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), step
    assert torch.equal(
        graphed.export_blocks(Tier.GPU, list(range(64))),
        plain.export_blocks(Tier.GPU, list(range(64))),
    )
    # Tables are padded to a common width, so the three plans share one key: three direct
    # calls (the third captures), then replays over each call's own tables.
    stats = graphed.stats()["decode_graphs"]
    assert (stats["graphs"], stats["captures"], stats["replays"]) == (1, 1, 4)
    assert plain.stats()["decode_graphs"] == {"graphs": 0, "captures": 0, "replays": 0}
    # At most decode_graphs graphs are kept: a key per layer here.
    one = Worker(2, LAYOUT, device="cuda", num_gpu_blocks=64, num_cpu_blocks=16, decode_graphs=1)
    for layer in (0, 0, 0, 1, 1, 1):
        q = torch.randn(2, 8, LAYOUT.head_dim).to(torch.bfloat16)
        one.attend_to_host(layer, plans[0], q).wait()
    assert one.stats()["decode_graphs"] == {"graphs": 1, "captures": 2, "replays": 0}


def test_decode_graphs_can_be_turned_off_and_on_again() -> None:
    gen = torch.Generator().manual_seed(6)
    worker = Worker(0, LAYOUT, device="cuda", num_gpu_blocks=64, num_cpu_blocks=16)
    data = torch.randn(64, *LAYOUT.block_shape, generator=gen).to(torch.bfloat16)
    worker.import_blocks(Tier.GPU, list(range(64)), data)
    plan = AttendPlan([[3, 9, 4], [20, 21]], [40, 17], [1, 1])
    q = torch.randn(2, 8, LAYOUT.head_dim, generator=gen).to(torch.bfloat16)
    want = worker.attend(0, plan, q)

    def calls(n: int) -> None:
        for _ in range(n):
            assert torch.equal(worker.attend_to_host(0, plan, q).wait(), want)

    calls(4)
    assert worker.stats()["decode_graphs"]["graphs"] == 0  # none by default
    worker.set_decode_graphs(2)
    calls(4)  # the third captures, the fourth replays
    assert worker.stats()["decode_graphs"] == {"graphs": 1, "captures": 1, "replays": 1}
    worker.set_decode_graphs(2)  # the same count keeps them
    calls(1)
    assert worker.stats()["decode_graphs"]["replays"] == 2
    worker.set_decode_graphs(0)
    calls(4)
    assert worker.stats()["decode_graphs"]["graphs"] == 0
