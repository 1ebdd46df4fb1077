"""Block moves on a CPU worker: copy-on-write, swap round trips, export/import between
workers, and the ordering of operations against swaps still in flight."""

from __future__ import annotations

from collections.abc import Callable

import kvservice.kernels as kernels
import pytest
import torch
from worker_helpers import (
    LAYOUT,
    dense_attention,
    make_seqs,
    make_worker,
    plan_for,
    queries,
    write_prefix,
)

from kvservice.core.ids import Tier

ATOL = 1e-5


def filled_worker(seed: int):
    worker = make_worker()
    worker.gpu_pool.copy_(
        torch.randn(worker.gpu_pool.shape, generator=torch.Generator().manual_seed(seed))
    )
    return worker


def test_copy_blocks_copies_whole_blocks_and_the_copy_is_independent() -> None:
    worker = filled_worker(0)
    before = worker.gpu_pool.clone()
    worker.copy_blocks([(3, 7), (4, 9)])
    assert torch.equal(worker.gpu_pool[7], before[3])
    assert torch.equal(worker.gpu_pool[9], before[4])
    untouched = [b for b in range(32) if b not in (7, 9)]
    assert torch.equal(worker.gpu_pool[untouched], before[untouched])
    # writing into the copy (the forked sequence's block) leaves the original alone
    k = torch.ones(1, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    worker.write_kv(0, torch.tensor([7 * LAYOUT.block_size]), k, k)
    assert torch.equal(worker.gpu_pool[3], before[3])
    assert worker.stats()["blocks_copied"] == 2


def test_swap_round_trip_restores_blocks_and_counts_bytes() -> None:
    worker = filled_worker(1)
    original = worker.gpu_pool[[1, 2, 5]].clone()
    worker.swap_out([(1, 0), (2, 3), (5, 7)])
    worker.import_blocks(Tier.GPU, [1, 2, 5], torch.zeros(3, *LAYOUT.block_shape))
    worker.swap_in([(0, 20), (3, 21), (7, 22)])
    assert torch.equal(worker.export_blocks(Tier.GPU, [20, 21, 22]), original)
    assert torch.equal(worker.export_blocks(Tier.CPU, [0, 3, 7]), original)
    stats = worker.stats()
    assert stats["bytes_swapped"] == {
        "gpu_to_cpu": 3 * LAYOUT.block_bytes,
        "cpu_to_gpu": 3 * LAYOUT.block_bytes,
    }
    assert stats["blocks_swapped"] == {"gpu_to_cpu": 3, "cpu_to_gpu": 3}


def test_export_import_moves_a_sequence_to_another_worker() -> None:
    gen = torch.Generator().manual_seed(2)
    source, target = make_worker(0), make_worker(1)
    seqs = make_seqs([10], gen)
    for layer in range(LAYOUT.num_layers):
        write_prefix(source, layer, seqs, [10])
    data = source.export_blocks(Tier.GPU, seqs[0].table)
    assert data.device.type == "cpu" and data.shape == (3, *LAYOUT.block_shape)
    moved = [30, 2, 17]
    target.import_blocks(Tier.GPU, moved, data)
    q = queries(1, gen)
    seqs[0].table = moved
    torch.testing.assert_close(
        target.attend(1, plan_for(seqs, [1]), q), dense_attention(q, seqs, [1])[0],
        atol=ATOL, rtol=ATOL,
    )  # fmt: skip
    # the host tier takes the same data
    target.import_blocks(Tier.CPU, [4, 0, 6], data)
    assert torch.equal(target.export_blocks(Tier.CPU, [4, 0, 6]), data)
    assert target.stats()["blocks_imported"] == 6


def test_empty_batches_are_no_ops() -> None:
    worker = filled_worker(3)
    before = worker.gpu_pool.clone()
    worker.copy_blocks([])
    worker.swap_out([])
    worker.swap_in(torch.empty(0, 2, dtype=torch.int64))
    worker.import_blocks(Tier.GPU, [], torch.empty(0, *LAYOUT.block_shape))
    assert worker.export_blocks(Tier.GPU, []).shape == (0, *LAYOUT.block_shape)
    assert torch.equal(worker.gpu_pool, before)


class DeferredSwap:
    """A swap handle whose copy happens only when someone waits for it."""

    def __init__(self, copy: Callable[[], None]) -> None:
        self._copy: Callable[[], None] | None = copy
        self.event = None

    def done(self) -> bool:
        return self._copy is None

    def wait(self) -> None:
        if self._copy is not None:
            self._copy()
            self._copy = None


@pytest.fixture
def deferred_swaps(monkeypatch: pytest.MonkeyPatch) -> list[DeferredSwap]:
    handles: list[DeferredSwap] = []

    def swap_blocks(src_pool, dst_pool, pairs, **_kwargs):
        pairs = pairs.clone()
        handle = DeferredSwap(lambda: kernels.swap_blocks_ref(src_pool, dst_pool, pairs))
        handles.append(handle)
        return handle

    monkeypatch.setattr(kernels, "swap_blocks", swap_blocks)
    return handles


def test_attention_waits_for_a_swap_in_of_the_blocks_it_reads(deferred_swaps) -> None:
    gen = torch.Generator().manual_seed(4)
    worker = make_worker()
    seqs = make_seqs([9], gen)
    write_prefix(worker, 0, seqs, [9])
    worker.swap_out([(b, i) for i, b in enumerate(seqs[0].table)])
    worker.synchronize()
    worker.import_blocks(Tier.GPU, seqs[0].table, torch.zeros(3, *LAYOUT.block_shape))
    new_table = [25, 26, 27]
    worker.swap_in([(i, b) for i, b in enumerate(new_table)])
    assert not deferred_swaps[-1].done()
    assert worker.stats()["tiers"]["gpu"]["blocks_in_flight"] == 3

    # attention elsewhere does not wait for it
    other = make_seqs([4], gen, first_block=28)
    write_prefix(worker, 0, other, [4])
    worker.attend(0, plan_for(other, [1]), queries(1, gen))
    assert not deferred_swaps[-1].done()

    seqs[0].table = new_table
    q = queries(1, gen)
    out = worker.attend(0, plan_for(seqs, [1]), q)
    assert deferred_swaps[-1].done()
    torch.testing.assert_close(out, dense_attention(q, seqs, [1])[0], atol=ATOL, rtol=ATOL)


def test_a_block_being_swapped_out_is_not_overwritten_early(deferred_swaps) -> None:
    worker = filled_worker(5)
    original = worker.gpu_pool[6].clone()
    worker.swap_out([(6, 2)])
    # the coordinator freed block 6 and hands it to another sequence at once
    k = torch.full((1, LAYOUT.num_kv_heads, LAYOUT.head_dim), 7.0)
    worker.write_kv(0, torch.tensor([6 * LAYOUT.block_size]), k, k)
    assert torch.equal(worker.export_blocks(Tier.CPU, [2])[0], original)


@pytest.mark.parametrize(
    "touch",
    [
        lambda w: w.export_blocks(Tier.CPU, [2]),
        lambda w: w.import_blocks(Tier.CPU, [2], torch.zeros(1, *LAYOUT.block_shape)),
        lambda w: w.copy_blocks([(6, 8)]),
        lambda w: w.import_blocks(Tier.GPU, [6], torch.zeros(1, *LAYOUT.block_shape)),
        lambda w: w.synchronize(),
    ],
    ids=["export-cpu", "import-cpu", "copy-src", "import-gpu", "synchronize"],
)
def test_touching_a_block_in_flight_waits_for_its_copy(deferred_swaps, touch) -> None:
    worker = filled_worker(6)
    worker.swap_out([(6, 2)])
    touch(worker)
    assert deferred_swaps[-1].done()
    assert worker.stats()["tiers"]["cpu"]["blocks_in_flight"] == 0


def test_touching_other_blocks_does_not_wait(deferred_swaps) -> None:
    worker = filled_worker(7)
    worker.swap_out([(6, 2)])
    worker.export_blocks(Tier.CPU, [3])
    worker.copy_blocks([(7, 8)])
    worker.import_blocks(Tier.GPU, [9], torch.zeros(1, *LAYOUT.block_shape))
    assert not deferred_swaps[-1].done()
