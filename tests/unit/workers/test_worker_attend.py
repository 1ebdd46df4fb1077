"""Worker.write_kv / attend on a CPU worker against an oracle built from contiguous K/V,
and against the kernels' references run on the worker's own pool."""

from __future__ import annotations

import kvservice.kernels as kernels
import pytest
import torch
from kvservice.workers import AttendPlan
from worker_helpers import (
    LAYOUT,
    dense_attention,
    make_seqs,
    make_worker,
    new_kv,
    plan_for,
    queries,
    write_prefix,
)

from kvservice.core.errors import InvalidArgument

ATOL = 1e-5


def kernel_calls(worker, name: str) -> int:
    return worker.stats()["kernel_time"].get(name, {}).get("calls", 0)


def test_decode_batch_matches_dense_attention_and_the_decode_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    worker = make_worker()
    seqs = make_seqs([5, 9, 1, 16], gen)
    write_prefix(worker, 1, seqs, [s.length for s in seqs])
    q = queries(len(seqs), gen)
    q_lens = [1] * len(seqs)

    out, lse = worker.attend(1, plan_for(seqs, q_lens), q, return_lse=True)

    want_out, want_lse = dense_attention(q, seqs, q_lens)
    torch.testing.assert_close(out, want_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse, want_lse, atol=ATOL, rtol=ATOL)
    width = max(len(s.table) for s in seqs)
    tables = torch.tensor([s.table + [0] * (width - len(s.table)) for s in seqs], dtype=torch.int32)
    ref = kernels.paged_decode_ref(
        q, worker.gpu_pool[:, 1, 0], worker.gpu_pool[:, 1, 1], tables,
        torch.tensor([s.length for s in seqs], dtype=torch.int32),
    )  # fmt: skip
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    assert kernel_calls(worker, "paged_decode") == 1
    assert kernel_calls(worker, "paged_extend") == 0


def test_layers_are_separate() -> None:
    gen = torch.Generator().manual_seed(1)
    worker = make_worker()
    seqs = make_seqs([7], gen)
    write_prefix(worker, 0, seqs, [7])
    q = queries(1, gen)
    # Layer 1 was never written: its cache is still zeros, so attention averages zeros.
    assert torch.count_nonzero(worker.attend(1, plan_for(seqs, [1]), q)) == 0
    assert torch.count_nonzero(worker.attend(0, plan_for(seqs, [1]), q)) > 0


@pytest.mark.parametrize("with_slots", [False, True])
def test_fused_write_and_mixed_batch_match_dense_attention(with_slots: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    worker = make_worker()
    # extend after a cached prefix, a decode step, and a fresh prefill in one batch
    seqs = make_seqs([11, 6, 5], gen)
    q_lens = [3, 1, 5]
    write_prefix(worker, 0, seqs, [s.length - n for s, n in zip(seqs, q_lens, strict=True)])
    q = queries(sum(q_lens), gen)
    k_new, v_new = new_kv(seqs, q_lens)

    out, lse = worker.attend(
        0, plan_for(seqs, q_lens, with_slots=with_slots), q, k_new, v_new, return_lse=True
    )

    want_out, want_lse = dense_attention(q, seqs, q_lens)
    torch.testing.assert_close(out, want_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse, want_lse, atol=ATOL, rtol=ATOL)
    # the new K/V now sit in the pool at their slots
    for seq in seqs:
        got = worker.gpu_pool[:, 0].index_select(0, torch.tensor(seq.table))
        got_k = got[:, 0].reshape(-1, LAYOUT.num_kv_heads, LAYOUT.head_dim)[: seq.length]
        torch.testing.assert_close(got_k, seq.k)
    assert kernel_calls(worker, "paged_extend") == 1
    assert kernel_calls(worker, "paged_decode") == 0


def test_skipped_new_slots_are_not_written() -> None:
    gen = torch.Generator().manual_seed(3)
    worker = make_worker()
    seqs = make_seqs([6], gen)
    write_prefix(worker, 0, seqs, [6])
    before = worker.gpu_pool.clone()
    plan = plan_for(seqs, [2], with_slots=True)
    plan = AttendPlan(plan.block_tables, plan.seq_lens, plan.q_lens, new_slots=[-1, -1])
    k_new, v_new = torch.zeros(2, 2, 16), torch.zeros(2, 2, 16)
    worker.attend(0, plan, queries(2, gen), k_new, v_new)
    assert torch.equal(worker.gpu_pool, before)


def test_sliding_window_on_a_decode_batch_matches_dense_attention() -> None:
    gen = torch.Generator().manual_seed(4)
    worker = make_worker()
    seqs = make_seqs([13, 3], gen)
    write_prefix(worker, 0, seqs, [13, 3])
    q = queries(2, gen)
    out = worker.attend(0, plan_for(seqs, [1, 1]), q, sliding_window=5)
    torch.testing.assert_close(
        out, dense_attention(q, seqs, [1, 1], sliding_window=5)[0], atol=ATOL, rtol=ATOL
    )
    assert kernel_calls(worker, "paged_extend") == 1


def test_explicit_scale_is_used() -> None:
    gen = torch.Generator().manual_seed(5)
    worker = make_worker()
    seqs = make_seqs([9], gen)
    write_prefix(worker, 0, seqs, [9])
    q = queries(1, gen)
    # scaling q by c with scale s/c leaves the result unchanged
    default = worker.attend(0, plan_for(seqs, [1]), q)
    scaled = worker.attend(0, plan_for(seqs, [1]), q * 2, scale=0.25 / 2)
    torch.testing.assert_close(default, scaled, atol=ATOL, rtol=ATOL)


def test_block_tables_may_be_a_padded_tensor() -> None:
    gen = torch.Generator().manual_seed(6)
    worker = make_worker()
    seqs = make_seqs([5, 14], gen)
    write_prefix(worker, 0, seqs, [5, 14])
    tables = torch.full((2, 6), -1, dtype=torch.int64)  # -1 padding past each table's end
    for i, seq in enumerate(seqs):
        tables[i, : len(seq.table)] = torch.tensor(seq.table)
    q = queries(2, gen)
    plan = AttendPlan(tables, torch.tensor([5, 14]), torch.tensor([1, 1]))
    torch.testing.assert_close(
        worker.attend(0, plan, q), dense_attention(q, seqs, [1, 1])[0], atol=ATOL, rtol=ATOL
    )


def test_new_slots_that_disagree_with_the_block_tables_are_refused() -> None:
    gen = torch.Generator().manual_seed(7)
    worker = make_worker()
    seqs = make_seqs([6], gen)
    plan = plan_for(seqs, [2], with_slots=True)
    slots = list(plan.new_slots)
    slots[1] += 1
    bad = AttendPlan(plan.block_tables, plan.seq_lens, plan.q_lens, new_slots=slots)
    k_new, v_new = new_kv(seqs, [2])
    with pytest.raises(InvalidArgument, match="new_slots"):
        worker.attend(0, bad, queries(2, gen), k_new, v_new)


def test_two_sequences_writing_one_shared_block_are_refused() -> None:
    gen = torch.Generator().manual_seed(8)
    worker = make_worker()
    seqs = make_seqs([6, 6], gen)
    seqs[1].table = list(seqs[0].table)  # a fork that was not copied before writing
    k_new, v_new = new_kv(seqs, [1, 1])
    with pytest.raises(InvalidArgument, match="same slot"):
        worker.attend(0, plan_for(seqs, [1, 1]), queries(2, gen), k_new, v_new)
    # reading a shared block is fine
    worker.attend(0, plan_for(seqs, [1, 1]), queries(2, gen))


def test_attend_to_host_gives_attend_s_result_and_writes() -> None:
    gen = torch.Generator().manual_seed(12)
    seqs = make_seqs([11, 6, 5], gen)
    q_lens = [3, 1, 5]
    q = queries(sum(q_lens), gen)
    k_new, v_new = new_kv(seqs, q_lens)
    results = []
    for queued in (False, True):
        worker = make_worker()
        write_prefix(worker, 0, seqs, [s.length - n for s, n in zip(seqs, q_lens, strict=True)])
        plan = plan_for(seqs, q_lens)
        if queued:
            out, lse = worker.attend_to_host(0, plan, q, k_new, v_new, return_lse=True).wait()
        else:
            out, lse = worker.attend(0, plan, q, k_new, v_new, return_lse=True)
        results.append((out, lse, worker.gpu_pool.clone()))
    (out, lse, pool), (queued_out, queued_lse, queued_pool) = results
    assert torch.equal(queued_out, out) and torch.equal(queued_lse, lse)
    assert torch.equal(queued_pool, pool)  # the same new K/V written
    with pytest.raises(InvalidArgument):
        make_worker().attend_to_host(0, plan_for(seqs, q_lens), q[:, :3])
