"""The plan path of Worker.attend: the list fast path against the tensor path, and the
per-step cache of checked plans (a plan object made of tuples is checked once)."""

from __future__ import annotations

import random

import pytest
import torch
from kvservice.workers import AttendPlan
from kvservice.workers.plan import PlanCache, prepare_plan
from worker_helpers import LAYOUT, make_seqs, make_worker, new_kv, plan_for, queries, write_prefix

from kvservice.core.errors import InvalidArgument

FIELDS = ("block_tables", "seq_lens", "cu_q_lens", "write_slots")


def random_plan(rng: random.Random, num_blocks: int, block_size: int) -> AttendPlan:
    batch = rng.randint(1, 6)
    ids = rng.sample(range(num_blocks), num_blocks)
    tables, seq_lens, q_lens = [], [], []
    for _ in range(batch):
        seq_len = rng.randint(1, 5 * block_size)
        count = -(-seq_len // block_size)
        tables.append([ids.pop() for _ in range(count)] + [0] * rng.randint(0, 2))  # spare
        seq_lens.append(seq_len)
        q_lens.append(rng.randint(1, seq_len))
    return AttendPlan(tables, seq_lens, q_lens, None)


def as_tensors(plan: AttendPlan) -> AttendPlan:
    width = max(len(r) for r in plan.block_tables)
    table = [list(r) + [0] * (width - len(r)) for r in plan.block_tables]
    return AttendPlan(torch.tensor(table), torch.tensor(plan.seq_lens), torch.tensor(plan.q_lens))


@pytest.mark.parametrize("seed", range(20))
def test_list_fast_path_matches_the_tensor_path(seed: int) -> None:
    rng = random.Random(seed)
    plan = random_plan(rng, num_blocks=64, block_size=4)
    rows = sum(plan.q_lens)
    fast = prepare_plan(plan, block_size=4, num_blocks=64, num_q_rows=rows, writes=True)
    slow = prepare_plan(as_tensors(plan), block_size=4, num_blocks=64, num_q_rows=rows, writes=True)
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert sorted(fast.read_blocks) == sorted(slow.read_blocks)
    assert (fast.num_tokens, fast.is_decode) == (slow.num_tokens, slow.is_decode)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"block_tables": [[70]]}, "outside"),
        ({"block_tables": [[True]]}, "ints"),
        ({"block_tables": [[1.0]]}, "ints"),
        ({"seq_lens": [3.0]}, "ints"),
        ({"seq_lens": [True]}, "ints"),
        ({"q_lens": [0]}, ">= 1"),
        ({"seq_lens": [5]}, "needs 2"),
        ({"new_slots": [9]}, "new_slots"),
    ],
)
def test_the_fast_path_leaves_bad_plans_to_the_checks(changes: dict, match: str) -> None:
    fields = {"block_tables": [[3]], "seq_lens": [3], "q_lens": [1], "new_slots": None}
    fields.update(changes)
    with pytest.raises(InvalidArgument, match=match):
        prepare_plan(AttendPlan(**fields), block_size=4, num_blocks=64, num_q_rows=1, writes=True)


def test_cache_keeps_only_immutable_plans_and_needs_the_same_object() -> None:
    cache = PlanCache(size=2)
    frozen = AttendPlan(((1, 2),), (5,), (1,))
    lists = AttendPlan([[1, 2]], [5], [1])
    inner_list = AttendPlan(([1, 2],), (5,), (1,))
    for plan in (frozen, lists, inner_list):
        cache.put(plan, 1, True, "device plan")  # type: ignore[arg-type]
    assert cache.get(frozen, 1, True) == "device plan"
    assert cache.get(lists, 1, True) is None
    assert cache.get(inner_list, 1, True) is None
    assert cache.get(AttendPlan(((1, 2),), (5,), (1,)), 1, True) is None  # equal, not the same
    assert cache.get(frozen, 2, True) is None  # another row count


def test_cache_checked_for_reading_does_not_serve_a_write() -> None:
    cache = PlanCache()
    plan = AttendPlan(((1, 2),), (5,), (1,))
    cache.put(plan, 1, False, "read only")  # type: ignore[arg-type]
    assert cache.get(plan, 1, False) == "read only"
    assert cache.get(plan, 1, True) is None


def test_cache_drops_the_oldest_plan() -> None:
    cache = PlanCache(size=2)
    plans = [AttendPlan(((i,),), (1,), (1,)) for i in range(3)]
    for plan in plans:
        cache.put(plan, 1, True, plan.block_tables)  # type: ignore[arg-type]
    assert cache.get(plans[0], 1, True) is None
    assert cache.get(plans[2], 1, True) == ((2,),)


def test_layers_of_a_step_reuse_one_checked_plan_and_stay_correct() -> None:
    """Two layers with one tuple plan object: the second call reuses the checked plan,
    and both layers' outputs equal those of fresh list plans."""
    gen = torch.Generator().manual_seed(3)
    q_lens = [1, 1, 1]
    cached, fresh = make_worker(), make_worker()
    seqs = make_seqs([5, 9, 16], gen)
    for worker in (cached, fresh):
        for layer in range(LAYOUT.num_layers):
            write_prefix(worker, layer, seqs, [s.length - 1 for s in seqs])
    lists = plan_for(seqs, q_lens)
    frozen = AttendPlan(
        tuple(tuple(t) for t in lists.block_tables), tuple(lists.seq_lens), tuple(q_lens)
    )
    q = queries(3, gen)
    k_new, v_new = new_kv(seqs, q_lens)
    calls = []
    original = cached._upload
    cached._upload = lambda prepared: calls.append(1) or original(prepared)  # type: ignore[method-assign]
    for layer in range(LAYOUT.num_layers):
        got = cached.attend(layer, frozen, q, k_new, v_new)
        want = fresh.attend(layer, plan_for(seqs, q_lens), q, k_new, v_new)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(calls) == 1
    torch.testing.assert_close(cached.gpu_pool, fresh.gpu_pool, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kept_plan_with_head_major_q_and_k_matches_the_reference() -> None:
    """On the device: one tuple plan for both layers (uploaded once), q and k as the
    head-major views a transformers layer hands over, a mixed extend/decode batch."""
    import kvservice.kernels as kernels
    from kvservice.workers import Worker

    from kvservice.core.ids import Tier
    from kvservice.core.layout import Layout

    layout = Layout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
    worker = Worker(0, layout, device="cuda", num_gpu_blocks=64, num_cpu_blocks=4)
    gen = torch.Generator().manual_seed(5)
    tables = ((3, 9, 4), (20, 21), (30,))
    seq_lens, q_lens = (40, 17, 9), (1, 3, 9)  # decode, extend, prefill
    for layer in range(2):
        for table, length, q_len in zip(tables, seq_lens, q_lens, strict=True):
            old = length - q_len
            if old:
                slots = torch.tensor([table[p // 16] * 16 + p % 16 for p in range(old)])
                k, v = torch.randn(2, old, 2, 64, generator=gen).to(torch.bfloat16)
                worker.write_kv(layer, slots, k, v)
    plan = AttendPlan(tables, seq_lens, q_lens)
    rows = sum(q_lens)
    uploads: list[int] = []
    upload = worker._upload
    worker._upload = lambda prepared: uploads.append(1) or upload(prepared)  # type: ignore[method-assign]
    for layer in range(2):
        q = torch.randn(8, rows, 64, generator=gen).to(torch.bfloat16).cuda().transpose(0, 1)
        k_new = torch.randn(2, rows, 64, generator=gen).to(torch.bfloat16).cuda().transpose(0, 1)
        v_new = torch.randn(rows, 2, 64, generator=gen).to(torch.bfloat16).cuda()
        out = worker.attend(layer, plan, q, k_new, v_new)
        pool = worker.export_blocks(Tier.GPU, list(range(64)))
        width = max(len(t) for t in tables)
        padded = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        cu = torch.tensor([0, 1, 4, 13], dtype=torch.int32)
        want = kernels.paged_extend_ref(
            q.cpu(), pool[:, layer, 0], pool[:, layer, 1], padded, cu,
            torch.tensor(seq_lens, dtype=torch.int32),
        )  # fmt: skip
        torch.testing.assert_close(out.cpu().float(), want.float(), atol=2e-2, rtol=2e-2)
        slots = [
            t[p // 16] * 16 + p % 16
            for t, n, m in zip(tables, seq_lens, q_lens, strict=True)
            for p in range(n - m, n)
        ]
        written = pool[:, layer, 0].reshape(-1, 2, 64)[torch.tensor(slots)]
        assert torch.equal(written, k_new.cpu())
    assert len(uploads) == 1
