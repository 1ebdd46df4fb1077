"""Attention calls across a process boundary (Ray) without per-element Python work.

A plan of nested tuples and CPU tensors pickle slowly: a 64 x 1024 block table is 65,536
Python ints pickled, unpickled and turned back into a tensor element by element on every
call, and torch's own reduction of a CPU tensor costs milliseconds. So the caller's
handle sends numpy arrays instead (Ray passes them out of band, nearly free):

- ``WirePlan``: an ``AttendPlan``'s tables as one ``[B, W]`` int32 array (rows padded
  with ``-1``, so a row shorter than its sequence needs is an out-of-range block id on
  the worker, never a silent read of block 0) and its lengths as int64 arrays, under a
  key. The sender gives one key to one plan object (plans reused over the layers of a
  step are immutable tuples), so the receiver decodes each key once and hands the worker
  the same ``AttendPlan`` object again: the worker's plan cache then skips checking and
  uploading it again.
- ``WireTensor``: a CPU tensor as a numpy array of the same bytes (bfloat16 travels as
  int16) and its dtype.

Plans with ``new_slots`` or ``block_tiers``, and anything that does not encode cleanly,
travel as they are: the worker checks them, and reports errors, exactly as before.
"""

from __future__ import annotations

import itertools
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from kvservice.workers.plan import AttendPlan, mark_frozen, unmark_frozen

# Torch dtypes numpy has no type for travel as an integer view of the same width.
_VIEWS = {torch.bfloat16: torch.int16}


@dataclass(frozen=True, slots=True)
class WireTensor:
    array: np.ndarray
    dtype: str  # the torch dtype's name, e.g. "bfloat16"


@dataclass(frozen=True, slots=True)
class WirePlan:
    key: tuple[int, int]  # (sender nonce, counter): one plan object of one sender
    block_tables: np.ndarray  # [B, W] int32, rows padded with -1
    seq_lens: np.ndarray  # [B] int64
    q_lens: np.ndarray  # [B] int64


def encode_tensor(value: Any) -> Any:
    """A CPU tensor as a ``WireTensor``; anything else as it is."""
    if type(value) is not torch.Tensor or value.device.type != "cpu" or value.requires_grad:
        return value
    view = _VIEWS.get(value.dtype)
    try:
        data = (value.view(view) if view is not None else value).numpy()
    except (TypeError, RuntimeError):
        return value  # no numpy form (complex half, quantized, ...): sent as it is
    return WireTensor(data, str(value.dtype).removeprefix("torch."))


def decode_tensor(value: Any) -> Any:
    """The tensor of a ``WireTensor`` (a private, writable copy when the received array
    is read-only, as Ray's zero-copy arrays are); anything else as it is."""
    if type(value) is not WireTensor:
        return value
    data = value.array if value.array.flags.writeable else value.array.copy()
    tensor = torch.from_numpy(data)
    dtype = getattr(torch, value.dtype)
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


def encode_result(value: Any) -> Any:
    if type(value) is tuple:
        return tuple(encode_tensor(v) for v in value)
    return encode_tensor(value)


def decode_result(value: Any) -> Any:
    if type(value) is tuple:
        return tuple(decode_tensor(v) for v in value)
    return decode_tensor(value)


class PlanEncoder:
    """The sender's side: the ``WirePlan`` of each plan object, made once per object."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._nonce = int.from_bytes(os.urandom(8), "little") >> 1
        self._counter = itertools.count()
        self._entries: dict[int, tuple[AttendPlan, WirePlan]] = {}

    def encode(self, plan: Any) -> Any:
        """``plan`` as a ``WirePlan`` when it is an AttendPlan of int tuples or lists
        without slots or tiers; anything else as it is."""
        if (
            type(plan) is not AttendPlan
            or plan.new_slots is not None
            or plan.block_tiers is not None
        ):
            return plan
        entry = self._entries.get(id(plan))
        if entry is not None and entry[0] is plan:
            return entry[1]
        wire = self._build(plan)
        if wire is None:
            return plan
        # Only immutable plans may be recognized again by identity.
        if type(plan.block_tables) is tuple and all(type(r) is tuple for r in plan.block_tables) \
                and type(plan.seq_lens) is tuple and type(plan.q_lens) is tuple:  # fmt: skip
            if len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]  # the oldest
            self._entries[id(plan)] = (plan, wire)
        return wire

    def _build(self, plan: AttendPlan) -> WirePlan | None:
        tables, seq_lens, q_lens = plan.block_tables, plan.seq_lens, plan.q_lens
        if not all(type(x) in (list, tuple) for x in (tables, seq_lens, q_lens)):
            return None
        if not all(type(r) in (list, tuple) for r in tables):  # type: ignore[union-attr]
            return None
        try:
            lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))  # type: ignore[arg-type]
            packed = array("i")
            for row in tables:  # type: ignore[union-attr]
                packed.fromlist(list(row))  # the fastest way from int rows to int32
            flat = np.frombuffer(packed, dtype=np.int32)
            seq = np.frombuffer(array("q", seq_lens), dtype=np.int64)  # type: ignore[arg-type]
            qs = np.frombuffer(array("q", q_lens), dtype=np.int64)  # type: ignore[arg-type]
        except (TypeError, OverflowError, ValueError):
            return None  # not plain ints in range: the worker reports it
        width = int(lens.max()) if lens.size else 0
        table = np.full((lens.size, max(1, width)), -1, dtype=np.int32)
        table[np.arange(max(1, width)) < lens[:, None]] = flat
        return WirePlan((self._nonce, next(self._counter)), table, seq, qs)


class PlanDecoder:
    """The receiver's side: one ``AttendPlan`` object per key (the last few keys), its
    tensors sharing the arrays' memory; such plans are known to the plan cache as frozen
    (nothing changes them: the worker only reads them)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._plans: OrderedDict[tuple[int, int], AttendPlan] = OrderedDict()

    def decode(self, value: Any) -> Any:
        if type(value) is not WirePlan:
            return value
        plan = self._plans.get(value.key)
        if plan is not None:
            self._plans.move_to_end(value.key)
            return plan
        plan = AttendPlan(
            _tensor(value.block_tables), _tensor(value.seq_lens), _tensor(value.q_lens), None
        )
        if len(self._plans) >= self._size:
            _key, old = self._plans.popitem(last=False)
            unmark_frozen(old)
        self._plans[value.key] = plan
        mark_frozen(plan)
        return plan


def _tensor(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data if data.flags.writeable else data.copy())
