"""Argument checks shared by the worker's entry points.

Each returns the argument in the form the worker uses (CPU int64 tensors for ids) or
raises InvalidArgument naming what is wrong; none of them mutates anything, so an entry
point that runs all its checks first changes nothing on a bad call.
"""

from __future__ import annotations

import operator

import torch
from kvservice.workers.plan import as_int_tensor

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier


def check_index(name: str, value: object, limit: int) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, got {value!r}")
    try:
        index = operator.index(value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InvalidArgument(f"{name} must be an int, got {value!r}") from exc
    if not 0 <= index < limit:
        raise InvalidArgument(f"{name}={index} is outside [0, {limit})")
    return index


def check_tier(tier: object) -> Tier:
    index = check_index("tier", tier, len(Tier))
    return Tier(index)


def check_block_ids(name: str, block_ids: object, num_blocks: int, *, unique: bool) -> torch.Tensor:
    ids = as_int_tensor(name, block_ids)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        bad = int(ids[(ids < 0) | (ids >= num_blocks)][0])
        raise InvalidArgument(f"{name}: block id {bad} is outside [0, {num_blocks})")
    if unique and torch.unique(ids).numel() != ids.numel():
        raise InvalidArgument(f"{name} names a block more than once")
    return ids


def check_pairs(
    name: str, pairs: object, *, num_src_blocks: int, num_dst_blocks: int, same_pool: bool
) -> torch.Tensor:
    """``[P, 2]`` int64 (src, dst); each dst at most once, and within one pool no block is
    both a source and a destination (the result would depend on the copy order)."""
    if isinstance(pairs, torch.Tensor):
        tensor = pairs.detach().to("cpu")
    else:
        try:
            tensor = torch.as_tensor(list(pairs), dtype=torch.int64)  # type: ignore[call-overload]
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgument(f"{name} must be a list of (src, dst) block ids: {exc}") from exc
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 2)
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point:
        raise InvalidArgument(f"{name} must hold ints, got dtype {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[1] != 2:
        raise InvalidArgument(f"{name} must be (src, dst) pairs, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.int64)
    src = check_block_ids(f"{name} sources", tensor[:, 0], num_src_blocks, unique=False)
    dst = check_block_ids(f"{name} destinations", tensor[:, 1], num_dst_blocks, unique=True)
    if same_pool and bool(torch.isin(dst, src).any()):
        raise InvalidArgument(f"{name}: a block is both a source and a destination")
    return tensor


def check_slots(slots: object, num_slots: int, length: int) -> torch.Tensor:
    """Slots as int64, each ``-1`` (skip) or in ``[0, num_slots)``, no slot twice."""
    tensor = as_int_tensor("slots", slots, length=length)
    if tensor.numel() and (int(tensor.min()) < -1 or int(tensor.max()) >= num_slots):
        bad = int(tensor[(tensor < -1) | (tensor >= num_slots)][0])
        raise InvalidArgument(f"slot {bad} is outside [0, {num_slots}) (and not -1 = skip)")
    written = tensor[tensor >= 0]
    if torch.unique(written).numel() != written.numel():
        raise InvalidArgument("slots name the same slot more than once")
    return tensor


def check_tensor(
    name: str,
    value: object,
    shape: tuple[int | None, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` (None = any size) on ``device`` or on the CPU."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise InvalidArgument(f"{name} must be {dtype}, got {value.dtype}")
    if value.dim() != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape, strict=True)
    ):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise InvalidArgument(f"{name} must have shape ({expected}), got {tuple(value.shape)}")
    if value.device != device and value.device.type != "cpu":
        where = "cpu" if device.type == "cpu" else f"{device} or cpu"
        raise InvalidArgument(f"{name} is on {value.device}; this worker takes tensors on {where}")
    return value
