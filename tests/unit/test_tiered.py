"""Worker attention over sequences with blocks in both tiers equals dense attention over
the whole K/V (CPU worker: the staging copy is a plain copy, the kernels their references)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from kvservice.workers import AttendPlan, Worker
from kvservice.workers.tiered import chunk_plans, split_plan

from kvservice.core.errors import InvalidArgument
from kvservice.core.layout import Layout

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)
HQ = 4
BS = LAYOUT.block_size


@dataclass
class Seq:
    k: torch.Tensor  # [L, Hkv, D]
    v: torch.Tensor
    table: list[int]
    tiers: list[int]


def make_worker(num_gpu: int = 24, num_cpu: int = 24, chunk_blocks: int = 3) -> Worker:
    worker = Worker(0, LAYOUT, num_gpu_blocks=num_gpu, num_cpu_blocks=num_cpu)
    worker.tiered.chunk_blocks = chunk_blocks
    return worker


class Placer:
    """Hands out distinct block ids per tier, shuffled, and writes K/V into the pools."""

    def __init__(self, worker: Worker, gen: torch.Generator) -> None:
        self.worker = worker
        self.free = [
            torch.randperm(worker.num_gpu_blocks, generator=gen).tolist(),
            torch.randperm(worker.num_cpu_blocks, generator=gen).tolist(),
        ]
        self.gen = gen

    def seq(self, length: int, tiers: list[int], layer: int = 1, written: int | None = None) -> Seq:
        shape = (length, LAYOUT.num_kv_heads, LAYOUT.head_dim)
        k, v = torch.randn(shape, generator=self.gen), torch.randn(shape, generator=self.gen)
        assert len(tiers) == LAYOUT.num_blocks_for(length)
        table = [self.free[t].pop() for t in tiers]
        written = length if written is None else written
        for i, (block, tier) in enumerate(zip(table, tiers, strict=True)):
            pool = self.worker.gpu_pool if tier == 0 else self.worker.cpu_pool
            n = min(BS, written - i * BS)
            if n > 0:
                pool[block, layer, 0, :n] = k[i * BS : i * BS + n]
                pool[block, layer, 1, :n] = v[i * BS : i * BS + n]
        return Seq(k, v, table, tiers)


def plan(seqs: list[Seq], q_lens: list[int], new_slots: list[int] | None = None) -> AttendPlan:
    return AttendPlan(
        block_tables=[s.table for s in seqs],
        seq_lens=[s.k.shape[0] for s in seqs],
        q_lens=q_lens,
        new_slots=new_slots,
        block_tiers=[s.tiers for s in seqs],
    )


def dense(
    q: torch.Tensor, seqs: list[Seq], q_lens: list[int], window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's last q_len tokens over its whole K/V (fp64)."""
    group = HQ // LAYOUT.num_kv_heads
    outs, lses, row = [], [], 0
    for s, n in zip(seqs, q_lens, strict=True):
        length = s.k.shape[0]
        k = s.k.repeat_interleave(group, dim=1).double()
        v = s.v.repeat_interleave(group, dim=1).double()
        scores = torch.einsum("thd,lhd->htl", q[row : row + n].double(), k) / math.sqrt(
            LAYOUT.head_dim
        )
        pos = torch.arange(length - n, length)[:, None]
        keys = torch.arange(length)[None, :]
        visible = keys <= pos
        if window is not None:
            visible &= keys > pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        lses.append(torch.logsumexp(scores, -1).T)
        outs.append(torch.einsum("htl,lhd->thd", torch.softmax(scores, -1), v))
        row += n
    return torch.cat(outs).float(), torch.cat(lses).float()


def queries(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn((n, HQ, LAYOUT.head_dim), generator=gen)


def close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_decode_batch_over_both_tiers_matches_dense_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    worker = make_worker()
    place = Placer(worker, gen)
    seqs = [
        place.seq(22, [0, 1, 1, 0, 1, 0]),  # sink hot, middle mixed, partial tail hot
        place.seq(16, [1, 1, 1, 0]),  # full tail hot
        place.seq(9, [1, 1, 1]),  # all cold, partial last block: a read-only row
        place.seq(7, [0, 0]),  # all hot, in a batch with cold ones
    ]
    q = queries(4, gen)
    got = worker.attend(1, plan(seqs, [1, 1, 1, 1]), q, return_lse=True)
    close(got, dense(q, seqs, [1, 1, 1, 1]))
    stats = worker.stats()["tiered"]
    assert stats["cold_blocks"] == 9 and stats["calls"] == 1
    assert stats["chunks_kernel"] == 3  # 9 distinct cold blocks, 3 per chunk


@pytest.mark.parametrize("chunk_blocks", [1, 2, 64])
def test_extend_with_fused_write_matches_dense_attention(chunk_blocks: int) -> None:
    gen = torch.Generator().manual_seed(chunk_blocks)
    worker = make_worker(chunk_blocks=chunk_blocks)
    place = Placer(worker, gen)
    q_lens = [6, 1, 3]
    # The new tokens' K/V is not in the cache yet: it comes with the call.
    seqs = [
        place.seq(21, [0, 1, 1, 0, 0, 0], written=15),
        place.seq(13, [1, 0, 1, 0], written=12),
        place.seq(8, [1, 0], written=5),
    ]
    q = queries(sum(q_lens), gen)
    k_new = torch.cat([s.k[-n:] for s, n in zip(seqs, q_lens, strict=True)])
    v_new = torch.cat([s.v[-n:] for s, n in zip(seqs, q_lens, strict=True)])
    out = worker.attend(1, plan(seqs, q_lens), q, k_new, v_new)
    torch.testing.assert_close(out, dense(q, seqs, q_lens)[0], atol=1e-5, rtol=1e-5)
    last = seqs[0].table[-1]  # the written tokens landed in their GPU blocks
    torch.testing.assert_close(worker.gpu_pool[last, 1, 0, :1], seqs[0].k[20:21])
    # Decode right after, reading what was just written.
    q2 = queries(3, gen)
    close(worker.attend(1, plan(seqs, [1, 1, 1]), q2, return_lse=True), dense(q2, seqs, [1, 1, 1]))


def test_shared_cold_blocks_are_streamed_once() -> None:
    gen = torch.Generator().manual_seed(3)
    worker = make_worker()
    place = Placer(worker, gen)
    parent = place.seq(12, [1, 1, 0])
    child = Seq(parent.k.clone(), parent.v.clone(), list(parent.table), list(parent.tiers))
    # The child diverged in its last block (a copy on write); the two cold blocks are shared.
    child.k[8:] = torch.randn(4, 2, 8, generator=gen)
    child.v[8:] = torch.randn(4, 2, 8, generator=gen)
    other = place.seq(4, [0])
    child.table[-1] = other.table[0]
    worker.gpu_pool[other.table[0], 1, 0] = child.k[8:]
    worker.gpu_pool[other.table[0], 1, 1] = child.v[8:]
    q = queries(5, gen)
    got = worker.attend(1, plan([parent, child], [2, 3]), q, return_lse=True)
    close(got, dense(q, [parent, child], [2, 3]))
    assert worker.stats()["tiered"]["cold_blocks"] == 2


def test_flattened_rows_over_a_cold_segment_skip_their_writes() -> None:
    """Unmasked rows over a CPU segment (a sequence split across workers): new_slots -1."""
    gen = torch.Generator().manual_seed(4)
    worker = make_worker()
    place = Placer(worker, gen)
    segment = place.seq(12, [1, 1, 1])
    q = queries(3, gen)
    p = AttendPlan([segment.table] * 3, [12] * 3, [1] * 3, [-1] * 3, [segment.tiers] * 3)
    k_junk = torch.randn(3, 2, 8, generator=gen)
    got = worker.attend(1, p, q, k_junk, k_junk, return_lse=True)
    want = [dense(q[i : i + 1], [segment], [1]) for i in range(3)]
    close(got, (torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])))
    assert worker.stats()["tiered"]["cold_blocks"] == 3  # once, not once per row


def test_sliding_window_skips_cold_blocks_outside_every_window() -> None:
    gen = torch.Generator().manual_seed(5)
    worker = make_worker()
    place = Placer(worker, gen)
    seqs = [place.seq(23, [0, 1, 1, 1, 0, 0]), place.seq(10, [1, 0, 0])]
    q = queries(3, gen)
    got = worker.attend(1, plan(seqs, [2, 1]), q, sliding_window=6, return_lse=True)
    close(got, dense(q, seqs, [2, 1], window=6))
    assert worker.stats()["tiered"].get("cold_blocks", 0) == 0
    with pytest.raises(InvalidArgument, match="sliding window"):
        worker.attend(1, plan(seqs, [2, 1]), q, sliding_window=9)


def test_misplaced_cold_blocks_are_refused_and_nothing_is_written() -> None:
    gen = torch.Generator().manual_seed(6)
    worker = make_worker()
    place = Placer(worker, gen)
    s = place.seq(12, [0, 1, 1])
    before = worker.gpu_pool.clone()
    q2, k2 = queries(2, gen), torch.randn(2, 2, 8, generator=gen)
    with pytest.raises(InvalidArgument, match="first query"):
        worker.attend(1, plan([s], [2]), q2)
    with pytest.raises(InvalidArgument, match="written into a CPU-tier block"):
        worker.attend(1, plan([s], [1]), q2[:1], k2[:1], k2[:1])
    bad_tier = AttendPlan([s.table], [12], [1], None, [[0, 2, 1]])
    with pytest.raises(InvalidArgument, match="0 \\(GPU\\) or 1 \\(CPU\\)"):
        worker.attend(1, bad_tier, q2[:1])
    far = AttendPlan([[s.table[0], 99, s.table[2]]], [12], [1], None, [s.tiers])
    with pytest.raises(InvalidArgument, match="CPU block id 99"):
        worker.attend(1, far, q2[:1])
    assert torch.equal(worker.gpu_pool, before)


def test_swapped_out_blocks_are_read_where_the_swap_put_them() -> None:
    gen = torch.Generator().manual_seed(7)
    worker = make_worker()
    place = Placer(worker, gen)
    s = place.seq(16, [0, 0, 0, 0])
    worker.swap_out([(s.table[1], 5), (s.table[2], 6)])
    moved = Seq(s.k, s.v, [s.table[0], 5, 6, s.table[3]], [0, 1, 1, 0])
    q = queries(1, gen)
    close(worker.attend(1, plan([moved], [1]), q, return_lse=True), dense(q, [moved], [1]))


def test_chunks_group_rows_and_put_the_partial_block_last() -> None:
    p = AttendPlan([[7, 3, 9], [3, 1]], [11, 5], [1, 1], None, [[1, 1, 1], [1, 1]])
    split = split_plan(
        p, block_size=4, num_gpu_blocks=4, num_cpu_blocks=10, num_q_rows=2, writes=False,
        sliding_window=None,
    )  # fmt: skip
    assert split.hot_plan is None
    assert split.cold_ids.tolist() == [1, 3, 7, 9]
    (chunk,) = chunk_plans(split, 8, 4)
    assert chunk.rows.tolist() == [0, 1]
    # Entry 0 reads blocks 7 and 3 (full: slots 2, 1), then 9 (3 tokens: slot 3) last;
    # entry 1 reads block 3 (slot 1), then its partial block 1 (slot 0).
    assert chunk.block_tables.tolist() == [[2, 1, 3], [1, 0, 0]]
    assert chunk.seq_lens.tolist() == [11, 5]


def test_the_layers_of_a_step_split_a_frozen_plan_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvservice.workers.tiered as tiered

    gen = torch.Generator().manual_seed(8)
    worker = make_worker()
    place = Placer(worker, gen)
    seqs = [place.seq(22, [0, 1, 1, 0, 1, 0], layer=0), place.seq(9, [1, 1, 0], layer=0)]
    for s in seqs:  # layer 1 holds other K/V at the same blocks
        other = place.seq(s.k.shape[0], s.tiers)
        for block, block_other, tier in zip(s.table, other.table, s.tiers, strict=True):
            pool = worker.gpu_pool if tier == 0 else worker.cpu_pool
            pool[block, 1] = pool[block_other, 1]
        s.k1, s.v1 = other.k, other.v  # type: ignore[attr-defined]
    frozen = AttendPlan(
        tuple(tuple(s.table) for s in seqs), (22, 9), (1, 1), None,
        tuple(tuple(s.tiers) for s in seqs),
    )  # fmt: skip
    calls = []
    real = tiered.split_plan
    monkeypatch.setattr(tiered, "split_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = queries(2, gen)
    close(worker.attend(0, frozen, q, return_lse=True), dense(q, seqs, [1, 1]))
    layer1 = [Seq(s.k1, s.v1, s.table, s.tiers) for s in seqs]  # type: ignore[attr-defined]
    close(worker.attend(1, frozen, q, return_lse=True), dense(q, layer1, [1, 1]))
    assert len(calls) == 1


def test_one_sequence_over_many_chunks_and_repeated_layers() -> None:
    """One decode row (every chunk reads all q rows): the chunks merge straight into the
    hot part's result, and a frozen plan gives the same answer on every call."""
    gen = torch.Generator().manual_seed(9)
    worker = make_worker(chunk_blocks=2)
    place = Placer(worker, gen)
    s = place.seq(37, [0, 1, 1, 1, 1, 1, 0, 1, 0, 0])
    frozen = AttendPlan((tuple(s.table),), (37,), (1,), None, (tuple(s.tiers),))
    q = queries(1, gen)
    want = dense(q, [s], [1])
    for _ in range(3):
        close(worker.attend(1, frozen, q, return_lse=True), want)
    assert worker.stats()["tiered"]["chunks_kernel"] == 3 * 3  # 6 cold blocks, 2 a chunk


def test_a_frozen_all_gpu_plan_skips_the_tiered_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvservice.workers.tiered as tiered

    gen = torch.Generator().manual_seed(10)
    worker = make_worker()
    place = Placer(worker, gen)
    s = place.seq(14, [0, 0, 0, 0])
    plain = AttendPlan((tuple(s.table),), (14,), (1,))
    all_gpu = AttendPlan(plain.block_tables, (14,), (1,), None, ((0, 0, 0, 0),))
    assert not tiered.has_cold_blocks(all_gpu)
    assert tiered.has_cold_blocks(
        AttendPlan(plain.block_tables, (14,), (1,), None, ((0, 1, 0, 0),))
    )
    q = queries(1, gen)
    monkeypatch.setattr(tiered, "split_plan", lambda *a, **k: pytest.fail("tiered path taken"))
    close(worker.attend(1, all_gpu, q, return_lse=True), dense(q, [s], [1]))
    monkeypatch.undo()
    # Forced through the two-part engine, it is the hot plan alone.
    got = worker.tiered.attend(
        1, all_gpu, q, None, None, scale=None, sliding_window=None, return_lse=True
    )
    close(got, dense(q, [s], [1]))
