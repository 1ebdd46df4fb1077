"""Every entry point refuses a bad call with InvalidArgument and leaves the worker as it was.

Each case is a valid call with one thing wrong; several of them carry valid K/V to write,
so a check done after the write would show up as a changed pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from kvservice.workers import AttendPlan, Worker
from worker_helpers import LAYOUT, make_seqs, make_worker, new_kv, plan_for, queries, write_prefix

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier

SEQ_LENS = [6, 3]
Q_LENS = [2, 1]
SEQS = make_seqs(SEQ_LENS, torch.Generator().manual_seed(0))
NEW_K, NEW_V = new_kv(SEQS, Q_LENS)
Q = queries(sum(Q_LENS), torch.Generator().manual_seed(1))
PLAN = plan_for(SEQS, Q_LENS, with_slots=True)
KV1 = torch.ones(1, LAYOUT.num_kv_heads, LAYOUT.head_dim)
BLOCK = torch.ones(1, *LAYOUT.block_shape)


def plan(**changes: object) -> AttendPlan:
    fields = {
        "block_tables": PLAN.block_tables,
        "seq_lens": PLAN.seq_lens,
        "q_lens": PLAN.q_lens,
        "new_slots": PLAN.new_slots,
    }
    fields.update(changes)
    return AttendPlan(**fields)  # type: ignore[arg-type]


def attend(p: AttendPlan = PLAN, q: torch.Tensor = Q, k=NEW_K, v=NEW_V, layer=0, **kw):
    return lambda w: w.attend(layer, p, q, k, v, **kw)


def write(layer=0, slots=(5,), k=KV1, v=KV1):
    return lambda w: w.write_kv(
        layer, torch.tensor(slots) if isinstance(slots, tuple) else slots, k, v
    )


T = sum(Q_LENS)
BAD_CALLS: dict[str, Callable[[Worker], object]] = {
    "write: layer out of range": write(layer=2),
    "write: negative layer": write(layer=-1),
    "write: bool layer": write(layer=True),
    "write: float layer": write(layer=1.0),
    "write: slot past the pool": write(slots=(32 * LAYOUT.block_size,)),
    "write: slot below -1": write(slots=(-2,)),
    "write: slot twice": write(slots=(5, 5), k=KV1.repeat(2, 1, 1), v=KV1.repeat(2, 1, 1)),
    "write: fewer slots than rows": write(slots=(5,), k=KV1.repeat(2, 1, 1), v=KV1.repeat(2, 1, 1)),
    "write: float slots": write(slots=torch.tensor([5.0])),
    "write: 2-D slots": write(slots=torch.tensor([[5]])),
    "write: float64 k": write(k=KV1.double()),
    "write: wrong kv heads": write(k=torch.ones(1, 3, LAYOUT.head_dim)),
    "write: v rows differ": write(v=KV1.repeat(2, 1, 1)),
    "write: k not a tensor": write(k=KV1.tolist()),
    "write: k on another device": write(k=KV1.to("meta")),
    "attend: block id past the pool": attend(plan(block_tables=[[32, 1], [2]])),
    "attend: negative block id": attend(plan(block_tables=[[-1, 1], [2]])),
    "attend: table too short": attend(plan(block_tables=[[PLAN.block_tables[0][0]], [2]])),
    "attend: seq_len below q_len": attend(plan(seq_lens=[1, 3])),
    "attend: q_len 0": attend(plan(q_lens=[0, 3], new_slots=None)),
    "attend: lengths disagree": attend(plan(q_lens=[2, 1, 1])),
    "attend: empty plan": attend(plan(block_tables=[], seq_lens=[], q_lens=[], new_slots=None)),
    "attend: float seq_lens": attend(plan(seq_lens=[6.0, 3.0])),
    "attend: new_slots too short": attend(plan(new_slots=PLAN.new_slots[:1])),
    "attend: new_slots elsewhere": attend(plan(new_slots=[0, 1, 2])),
    "attend: q rows != sum(q_lens)": attend(q=Q[:2], k=None, v=None),
    "attend: q heads not a multiple": attend(q=torch.ones(T, 3, LAYOUT.head_dim)),
    "attend: q wrong head dim": attend(q=torch.ones(T, 4, 8)),
    "attend: q float64": attend(q=Q.double()),
    "attend: k_new without v_new": attend(v=None),
    "attend: k_new wrong rows": attend(k=NEW_K[:1]),
    "attend: zero scale": attend(scale=0.0),
    "attend: nan scale": attend(scale=math.nan),
    "attend: string scale": attend(scale="0.1"),
    "attend: zero window": attend(sliding_window=0),
    "attend: return_lse not bool": attend(return_lse="yes"),
    "attend: layer out of range": attend(layer=2),
    "attend: plan is a dict": attend(p={"seq_lens": SEQ_LENS}),  # type: ignore[arg-type]
    "copy: destination twice": lambda w: w.copy_blocks([(1, 2), (3, 2)]),
    "copy: chain": lambda w: w.copy_blocks([(1, 2), (2, 3)]),
    "copy: past the pool": lambda w: w.copy_blocks([(1, 2), (3, 32)]),
    "copy: triples": lambda w: w.copy_blocks([(1, 2, 3)]),
    "copy: floats": lambda w: w.copy_blocks(torch.tensor([[1.0, 2.0]])),
    "swap_out: host block past the pool": lambda w: w.swap_out([(1, 0), (2, 8)]),
    "swap_out: device block past the pool": lambda w: w.swap_out([(32, 0)]),
    "swap_out: destination twice": lambda w: w.swap_out([(1, 0), (2, 0)]),
    "swap_in: host block past the pool": lambda w: w.swap_in([(8, 1)]),
    "export: tier 2": lambda w: w.export_blocks(2, [0]),
    "export: negative block": lambda w: w.export_blocks(Tier.GPU, [-1]),
    "import: block twice": lambda w: w.import_blocks(
        Tier.GPU, [1, 1], BLOCK.repeat(2, 1, 1, 1, 1, 1)
    ),
    "import: wrong shape": lambda w: w.import_blocks(Tier.GPU, [1, 2], BLOCK),
    "import: wrong dtype": lambda w: w.import_blocks(Tier.CPU, [1], BLOCK.half()),
    "import: tier by name": lambda w: w.import_blocks("gpu", [1], BLOCK),
}


def snapshot(worker: Worker) -> tuple:
    return worker.gpu_pool.clone(), worker.cpu_pool.clone(), worker.ledger().records, worker.stats()


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_call_raises_and_changes_nothing(call: Callable[[Worker], object]) -> None:
    worker = make_worker()
    write_prefix(worker, 0, SEQS, [n - q for n, q in zip(SEQ_LENS, Q_LENS, strict=True)])
    worker.swap_out([(SEQS[0].table[0], 1)])
    gpu, cpu, records, stats = snapshot(worker)

    with pytest.raises(InvalidArgument):
        call(worker)

    assert torch.equal(worker.gpu_pool, gpu)
    assert torch.equal(worker.cpu_pool, cpu)
    assert worker.stats() == stats  # before ledger(), which counts as a call
    assert worker.ledger().records == records


def test_the_valid_versions_of_the_bad_calls_succeed() -> None:
    # the cases above differ from these in one thing each, so they fail for that thing
    worker = make_worker()
    write_prefix(worker, 0, SEQS, [n - q for n, q in zip(SEQ_LENS, Q_LENS, strict=True)])
    write()(worker)
    attend(scale=0.5, sliding_window=4, return_lse=True)(worker)
    worker.copy_blocks([(1, 2), (3, 4)])
    worker.swap_out([(1, 0), (2, 7)])
    worker.swap_in([(7, 1)])
    worker.export_blocks(Tier.GPU, [0, 31])
    worker.import_blocks(Tier.CPU, [1], BLOCK)
