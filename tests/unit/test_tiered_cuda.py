"""The tiered attention path on a CUDA worker (skipped without a GPU): both staging copy
modes, chunks overlapping the copies, and swaps queued just before (stream ordering)."""

from __future__ import annotations

import pytest
import torch
from kvservice.workers import Worker
from test_tiered import LAYOUT, Placer, Seq, close, dense, plan, queries

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_worker(copy_mode: str) -> Worker:
    worker = Worker(0, LAYOUT, device="cuda", num_gpu_blocks=32, num_cpu_blocks=32)
    worker.tiered.chunk_blocks = 3
    worker.tiered.copy_mode = copy_mode
    return worker


@pytest.mark.parametrize("copy_mode", ["kernel", "memcpy2d", "auto"])
def test_decode_and_extend_over_both_tiers_on_the_gpu(copy_mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    worker = cuda_worker(copy_mode)
    place = Placer(worker, gen)
    seqs = [
        place.seq(30, [0, 1, 1, 1, 1, 0, 1, 0]),
        place.seq(16, [1, 1, 1, 0]),
        place.seq(9, [1, 1, 1]),
    ]
    q = queries(3, gen)
    for _ in range(2):  # the second call reuses the staging buffers
        got = worker.attend(1, plan(seqs, [1, 1, 1]), q, return_lse=True)
        close(got, dense(q, seqs, [1, 1, 1]))
    q_ext = queries(6, gen)
    got = worker.attend(1, plan(seqs[:2], [2, 4]), q_ext, return_lse=True)
    close(got, dense(q_ext, seqs[:2], [2, 4]))
    # Inputs on the GPU give outputs on the GPU.
    out = worker.attend(1, plan(seqs, [1, 1, 1]), q.cuda())
    assert out.is_cuda
    worker.synchronize()
    if copy_mode != "auto":  # auto picks per chunk
        assert worker.stats()["tiered"][f"chunks_{copy_mode}"] > 0


def test_blocks_swapped_out_just_before_are_read_after_the_swap() -> None:
    gen = torch.Generator().manual_seed(1)
    worker = cuda_worker("auto")
    place = Placer(worker, gen)
    s = place.seq(32, [0] * 8)
    pairs = [(s.table[i], 20 + i) for i in range(1, 7)]
    worker.swap_out(pairs)  # in flight when attention starts
    moved = Seq(s.k, s.v, [s.table[0], *range(21, 27), s.table[7]], [0, 1, 1, 1, 1, 1, 1, 0])
    q = queries(1, gen)
    close(worker.attend(1, plan([moved], [1]), q, return_lse=True), dense(q, [moved], [1]))
