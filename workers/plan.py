"""The attention plan a worker receives, and its checked tensor form.

``AttendPlan`` is what crosses the process boundary: plain lists (or int tensors), one
entry per sequence. ``prepare_plan`` checks it completely against the pool and turns it
into the tensors the kernels take. Invariants of a prepared plan:
- every block id a kernel will read is in ``[0, num_blocks)``; table entries past a
  sequence's last block are zeroed, so padding never points outside the pool; tables
  are ``table_width`` entries wide (a multiple of 16, see there);
- ``write_slots`` are the slots of the sequences' new tokens (positions
  ``seq_len - q_len .. seq_len - 1``) as the block tables place them, ``-1`` where the
  caller asked to skip; when they are to be written no slot appears twice (two sequences
  writing one shared block would corrupt each other: such a block must be copied first).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain

import numpy as np
import torch

from kvservice.core.errors import InvalidArgument

IntList = Sequence[int] | torch.Tensor

# Prepared block tables are a multiple of this many entries wide: the kernels take the
# table's row stride as an argument, and Triton compiles a kernel again when a stride
# becomes 1 or a multiple of 16 where it was neither (or the reverse). A fixed multiple
# keeps one compiled variant however the widest sequence grows.
TABLE_WIDTH_MULTIPLE = 16


def table_width(num_blocks: int) -> int:
    """The prepared table width for sequences of at most ``num_blocks`` blocks."""
    return max(1, -(-num_blocks // TABLE_WIDTH_MULTIPLE)) * TABLE_WIDTH_MULTIPLE


@dataclass(frozen=True, slots=True)
class AttendPlan:
    """Where each sequence of a batch lives and which of its tokens are new.

    One entry per sequence; the batch's q rows are the sequences' new tokens, in order.
    ``new_slots`` (one per q row, ``-1`` = skip) is optional: the worker derives the
    slots from the block tables and, when given, checks they agree.
    ``block_tiers`` (optional, shaped like ``block_tables``) names each block's tier:
    0 = an id in the GPU pool, 1 = an id in the CPU pool; None = all GPU. A plan with
    CPU-tier blocks takes the tiered path (``kvservice.workers.tiered``).
    """

    block_tables: Sequence[Sequence[int]] | torch.Tensor
    seq_lens: IntList
    q_lens: IntList
    new_slots: IntList | None = None
    block_tiers: Sequence[Sequence[int]] | torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class PreparedPlan:
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_q_lens: torch.Tensor  # [B + 1] int32
    write_slots: torch.Tensor  # [T] int64, -1 = skip
    read_blocks: list[int]  # distinct block ids the kernels read (host ints)
    num_tokens: int
    is_decode: bool  # every q_len is 1


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """A prepared plan whose kernel tensors are on the worker's device."""

    prepared: PreparedPlan
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_q_lens: torch.Tensor
    write_slots: torch.Tensor


class PlanCache:
    """The device plans of the last few plan objects, so that the layers of one step,
    which attend with one plan object, check it and copy it to the device once.

    Only plans built of tuples (immutable all the way down) are kept, and a hit needs the
    very same object: such a plan cannot have changed since it was checked.
    """

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._entries: dict[int, tuple[AttendPlan, int, bool, DevicePlan]] = {}

    def get(self, plan: object, num_tokens: int, writes: bool) -> DevicePlan | None:
        entry = self._entries.get(id(plan))
        if entry is None or entry[0] is not plan or entry[1] != num_tokens:
            return None
        if writes and not entry[2]:
            return None  # checked for reading only: distinct write slots were not checked
        return entry[3]

    def put(self, plan: AttendPlan, num_tokens: int, writes: bool, device_plan: DevicePlan) -> None:
        if not _is_frozen(plan):
            return
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[id(plan)] = (plan, num_tokens, writes, device_plan)

    def clear(self) -> None:
        self._entries.clear()


# Plans of tensors that nothing will change (decoded from the wire by the receiver, which
# keeps them alive while they are here), by id: the cache may keep them like tuple plans.
_FROZEN: dict[int, AttendPlan] = {}


def mark_frozen(plan: AttendPlan) -> None:
    """Let the plan cache keep ``plan`` (its tensors are never written) until unmarked."""
    _FROZEN[id(plan)] = plan


def unmark_frozen(plan: AttendPlan) -> None:
    if _FROZEN.get(id(plan)) is plan:
        del _FROZEN[id(plan)]


def _is_frozen(plan: AttendPlan) -> bool:
    if _FROZEN.get(id(plan)) is plan:
        return True

    def flat(values: object) -> bool:
        return values is None or type(values) is tuple

    def nested(rows: object) -> bool:
        return rows is None or (type(rows) is tuple and all(type(r) is tuple for r in rows))

    return (
        nested(plan.block_tables)
        and nested(plan.block_tiers)
        and flat(plan.seq_lens)
        and flat(plan.q_lens)
        and flat(plan.new_slots)
    )


def as_int_tensor(name: str, values: object, *, length: int | None = None) -> torch.Tensor:
    """A 1-D int64 CPU tensor from a list or int tensor, or InvalidArgument."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().to("cpu")
    else:
        try:
            tensor = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgument(f"{name} must be a list of ints: {exc}") from exc
    if tensor.numel() == 0 and not isinstance(values, torch.Tensor):
        tensor = tensor.to(torch.int64)  # [] has no ints to infer the dtype from
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.is_complex():
        raise InvalidArgument(f"{name} must hold ints, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if length is not None and tensor.numel() != length:
        raise InvalidArgument(f"{name} has {tensor.numel()} entries, expected {length}")
    return tensor.to(torch.int64)


def _used_table(
    block_tables: object, num_blocks_needed: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [B, width] int64 with unused entries zeroed, used entries in row order)."""
    batch = num_blocks_needed.numel()
    used_mask = torch.arange(width).unsqueeze(0) < num_blocks_needed.unsqueeze(1)
    if isinstance(block_tables, torch.Tensor):
        table = block_tables.detach().to("cpu")
        if table.dtype == torch.bool or table.dtype.is_floating_point or table.dim() != 2:
            raise InvalidArgument(
                f"block_tables must be a 2-D int tensor, got {table.dtype} {tuple(table.shape)}"
            )
        if table.shape[0] != batch or table.shape[1] < width:
            raise InvalidArgument(
                f"block_tables has shape {tuple(table.shape)}; need {batch} rows of at "
                f"least {width} blocks"
            )
        table = torch.where(used_mask, table[:, :width].to(torch.int64), 0)
        return table, table[used_mask]
    if isinstance(block_tables, (str, bytes)) or not isinstance(block_tables, Sequence):
        raise InvalidArgument("block_tables must be a list of lists of block ids")
    if len(block_tables) != batch:
        raise InvalidArgument(f"block_tables has {len(block_tables)} rows, expected {batch}")
    needed = num_blocks_needed.tolist()
    for i, (row, count) in enumerate(zip(block_tables, needed, strict=True)):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence | torch.Tensor):
            raise InvalidArgument(f"block_tables[{i}] must be a list of block ids")
        if len(row) < count:
            raise InvalidArgument(
                f"block_tables[{i}] has {len(row)} blocks; seq_lens[{i}] needs {count}"
            )
    flat = as_int_tensor(
        "block_tables",
        list(chain.from_iterable(row[:n] for row, n in zip(block_tables, needed, strict=True))),
    )
    table = torch.zeros((batch, width), dtype=torch.int64)
    table[used_mask] = flat
    return table, flat


def plan_lengths(plan: AttendPlan, num_q_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's ``seq_lens`` and ``q_lens`` (int64, on CPU), checked against each other
    and against the ``num_q_rows`` rows of q."""
    if not isinstance(plan, AttendPlan):
        raise InvalidArgument(f"plan must be an AttendPlan, got {type(plan).__name__}")
    seq_lens = as_int_tensor("seq_lens", plan.seq_lens)
    batch = seq_lens.numel()
    if batch == 0:
        raise InvalidArgument("the plan has no sequences")
    q_lens = as_int_tensor("q_lens", plan.q_lens, length=batch)
    if bool((q_lens < 1).any()):
        raise InvalidArgument(f"every q_len must be >= 1, got {q_lens.tolist()}")
    if bool((seq_lens < q_lens).any()):
        bad = int(torch.nonzero(seq_lens < q_lens)[0])
        raise InvalidArgument(
            f"seq_lens[{bad}]={int(seq_lens[bad])} is shorter than q_lens[{bad}]={int(q_lens[bad])}"
        )
    if int(seq_lens.max()) > 2**31 - 1:
        raise InvalidArgument("seq_lens must fit in int32")
    num_tokens = int(q_lens.sum())
    if num_tokens != num_q_rows:
        raise InvalidArgument(f"q has {num_q_rows} rows but the plan's q_lens sum to {num_tokens}")
    return seq_lens, q_lens


def prepare_plan(
    plan: AttendPlan, *, block_size: int, num_blocks: int, num_q_rows: int, writes: bool
) -> PreparedPlan:
    """Check ``plan`` against a pool of ``num_blocks`` and build the kernels' tensors (on CPU).

    ``writes``: the new tokens' K/V will be written, so no two of them may share a slot
    (reading one shared block from several sequences is fine).
    """
    fast = _prepare_int_lists(plan, block_size, num_blocks, num_q_rows, writes)
    if fast is not None:
        return fast
    seq_lens, q_lens = plan_lengths(plan, num_q_rows)
    batch, num_tokens = seq_lens.numel(), num_q_rows
    needed = (seq_lens + block_size - 1) // block_size
    width = int(needed.max())
    table, used = _used_table(plan.block_tables, needed, width)
    table = torch.nn.functional.pad(table, (0, table_width(width) - width))
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        bad = int(used[(used < 0) | (used >= num_blocks)][0])
        raise InvalidArgument(f"block id {bad} in block_tables is outside [0, {num_blocks})")

    # Slots of the new tokens, as the block tables place them.
    cu_q_lens = torch.zeros(batch + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=cu_q_lens[1:])
    row_seq = torch.repeat_interleave(torch.arange(batch), q_lens)
    positions = seq_lens[row_seq] - q_lens[row_seq] + torch.arange(num_tokens) - cu_q_lens[row_seq]
    derived = table[row_seq, positions // block_size] * block_size + positions % block_size
    write_slots = derived
    if plan.new_slots is not None:
        given = as_int_tensor("new_slots", plan.new_slots, length=num_tokens)
        wrong = (given != -1) & (given != derived)
        if bool(wrong.any()):
            row = int(torch.nonzero(wrong)[0])
            raise InvalidArgument(
                f"new_slots[{row}]={int(given[row])} but the block tables put that token "
                f"(sequence {int(row_seq[row])}, position {int(positions[row])}) at slot "
                f"{int(derived[row])}"
            )
        write_slots = given
    written = write_slots[write_slots >= 0]
    if writes and torch.unique(written).numel() != written.numel():
        raise InvalidArgument(
            "two new tokens map to the same slot: a block shared by several sequences "
            "must be copied before it is written"
        )
    return PreparedPlan(
        block_tables=table.to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        cu_q_lens=cu_q_lens.to(torch.int32),
        write_slots=write_slots,
        read_blocks=_distinct_sorted(used, num_blocks),
        num_tokens=num_tokens,
        is_decode=bool((q_lens == 1).all()),
    )


def _distinct_sorted(ids: torch.Tensor, num_blocks: int) -> list[int]:
    """The distinct ids (all in ``[0, num_blocks)``), sorted: a mark per block, where
    ``torch.unique`` sorts and costs milliseconds for a wide decode batch's table."""
    if ids.numel() == 0:
        return []
    seen = np.zeros(num_blocks, dtype=np.bool_)
    seen[ids.numpy()] = True
    return np.flatnonzero(seen).tolist()


def _int_list(values: object) -> list[int] | tuple[int, ...] | None:
    """``values`` when it is a list or tuple of exact ints (no bools, floats, numpy ints)."""
    if type(values) not in (list, tuple):
        return None
    if values and set(map(type, values)) != {int}:  # type: ignore[call-overload]
        return None
    return values  # type: ignore[return-value]


def _prepare_int_lists(
    plan: AttendPlan, block_size: int, num_blocks: int, num_q_rows: int, writes: bool
) -> PreparedPlan | None:
    """``prepare_plan`` for a plan of plain int lists (what the coordinator sends), in
    Python: a few hundred microseconds for a decode batch, where the tensor path runs
    dozens of small CPU ops whose threading overhead can cost milliseconds.

    Returns None when anything is off (or the plan holds tensors): the general path then
    checks the plan again and raises the precise error."""
    if not isinstance(plan, AttendPlan):
        return None
    seq_lens, q_lens = _int_list(plan.seq_lens), _int_list(plan.q_lens)
    tables = plan.block_tables
    if seq_lens is None or q_lens is None or type(tables) not in (list, tuple):
        return None
    batch = len(seq_lens)
    if not batch or len(q_lens) != batch or len(tables) != batch:  # type: ignore[arg-type]
        return None
    if min(q_lens) < 1 or sum(q_lens) != num_q_rows or max(seq_lens) > 2**31 - 1:
        return None
    needed = [-(-n // block_size) for n in seq_lens]
    width = table_width(max(needed))
    flat: list[int] = []  # the padded table, row by row
    used: list[int] = []
    slots: list[int] = []
    for row, count, seq_len, q_len in zip(tables, needed, seq_lens, q_lens, strict=True):  # type: ignore[arg-type]
        if type(row) not in (list, tuple) or len(row) < count or seq_len < q_len:
            return None
        part = row[:count]
        used.extend(part)
        flat.extend(part)
        flat.extend([0] * (width - count))
        for pos in range(seq_len - q_len, seq_len):
            slots.append(part[pos // block_size] * block_size + pos % block_size)
    if _int_list(used) is None or (used and (min(used) < 0 or max(used) >= num_blocks)):
        return None
    if plan.new_slots is not None:
        given = _int_list(plan.new_slots)
        if given is None or len(given) != num_q_rows:
            return None
        if any(g != -1 and g != d for g, d in zip(given, slots, strict=True)):
            return None
        slots = list(given)
    written = [s for s in slots if s >= 0]
    if writes and len(set(written)) != len(written):
        return None
    cu_q_lens = [0, *accumulate(q_lens)]
    return PreparedPlan(
        block_tables=_tensor(flat, "i").view(batch, width),
        seq_lens=_tensor(seq_lens, "i"),
        cu_q_lens=_tensor(cu_q_lens, "i"),
        write_slots=_tensor(slots, "q"),
        read_blocks=list(set(used)),
        num_tokens=num_q_rows,
        is_decode=max(q_lens) == 1,
    )


def _tensor(values: Sequence[int], typecode: str) -> torch.Tensor:
    """A CPU int32 ("i") or int64 ("q") tensor; through ``array``, several times faster
    than ``torch.tensor`` on a list."""
    dtype = torch.int32 if typecode == "i" else torch.int64
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array(typecode, values), dtype=dtype)
