"""Attention calls in wire form (numpy plans and tensors, as a Ray handle sends them):
the same answers as direct calls, one decode and one upload per plan key, and a plan the
wire cannot carry faithfully still refused by the worker."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from kvservice.workers.actor import RayWorker
from kvservice.workers.plan import AttendPlan
from kvservice.workers.wire import (
    PlanEncoder,
    WirePlan,
    WireTensor,
    decode_result,
    encode_tensor,
)
from worker_helpers import LAYOUT, NUM_Q_HEADS, make_seqs

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier


def _pickled(value: object) -> object:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, 5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers)


def _filled_worker(gen: torch.Generator) -> tuple[RayWorker, list, AttendPlan]:
    worker = RayWorker(0, LAYOUT, num_gpu_blocks=32, num_cpu_blocks=8)
    seqs = make_seqs([5, 9, 16], gen)
    for seq in seqs:
        worker.write_kv(0, seq.slots(0, seq.length), seq.k, seq.v)
    plan = AttendPlan(
        tuple(tuple(s.table) for s in seqs), tuple(s.length for s in seqs), (1, 1, 1), None
    )
    return worker, seqs, plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    tensor = (torch.randn(3, 4, 5) * 100).to(dtype)
    wire = _pickled(encode_tensor(tensor))
    assert isinstance(wire, WireTensor)
    back = decode_result(wire)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_wire_call_matches_a_direct_call_and_decodes_a_key_once() -> None:
    gen = torch.Generator().manual_seed(0)
    worker, _seqs, plan = _filled_worker(gen)
    q = torch.randn((3, NUM_Q_HEADS, LAYOUT.head_dim), generator=gen)
    want = worker.attend(0, plan, q)
    encoder = PlanEncoder()
    wire = encoder.encode(plan)
    assert isinstance(wire, WirePlan) and encoder.encode(plan) is wire  # once per object
    assert wire.block_tables.dtype == np.int32 and (wire.block_tables[0, 2:] == -1).all()
    for layer in (0, 1, 0):
        out = decode_result(
            worker.wire_call(worker.epoch, "attend", layer, _pickled(wire), encode_tensor(q))
        )
        if layer == 0:
            assert torch.equal(out, want)
    decoded = worker._wire_plans.decode(_pickled(wire))
    assert worker._wire_plans.decode(_pickled(wire)) is decoded  # one object per key
    assert worker._plans.get(decoded, 3, False) is not None  # checked and uploaded once
    # A new plan object is a new key, even with equal contents.
    other = AttendPlan(tuple(plan.block_tables), plan.seq_lens, plan.q_lens, None)
    assert encoder.encode(other).key != wire.key


def test_short_row_is_still_refused() -> None:
    gen = torch.Generator().manual_seed(1)
    worker, seqs, _plan = _filled_worker(gen)
    short = AttendPlan((tuple(seqs[2].table[:2]),), (16,), (1,), None)  # needs 4 blocks
    q = torch.randn((1, NUM_Q_HEADS, LAYOUT.head_dim), generator=gen)
    wire = PlanEncoder().encode(short)
    assert isinstance(wire, WirePlan)
    with pytest.raises(InvalidArgument):
        worker.wire_call(worker.epoch, "attend", 0, _pickled(wire), encode_tensor(q))


def test_plans_the_wire_does_not_carry_travel_as_they_are() -> None:
    encoder = PlanEncoder()
    with_slots = AttendPlan(((1, 2),), (5,), (1,), (4,))
    assert encoder.encode(with_slots) is with_slots
    too_big = AttendPlan(((2**40,),), (1,), (1,), None)
    assert encoder.encode(too_big) is too_big
    floats = AttendPlan(((1.5,),), (1,), (1,), None)
    assert encoder.encode(floats) is floats


def test_blocks_moved_through_host_memory_travel_as_arrays() -> None:
    # Export and import (the host path of a transfer) in wire form: numpy both ways, which
    # Ray passes as a buffer instead of pickling a tensor; the blocks arrive bit-exact.
    gen = torch.Generator().manual_seed(3)
    source, _seqs, _plan = _filled_worker(gen)
    target = RayWorker(1, LAYOUT, num_gpu_blocks=32, num_cpu_blocks=8)
    exported = _pickled(source.wire_call(source.epoch, "export_blocks", Tier.GPU, [0, 5, 9]))
    assert isinstance(exported, WireTensor)
    target.wire_call(target.epoch, "import_blocks", Tier.GPU, [1, 2, 3], exported)
    assert torch.equal(
        target.export_blocks(Tier.GPU, [1, 2, 3]), source.export_blocks(Tier.GPU, [0, 5, 9])
    )
