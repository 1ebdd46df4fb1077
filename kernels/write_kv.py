"""KV write: scatter the new K/V of a ragged batch into their cache slots.

A slot is ``block_id * block_size + offset``; ``-1`` marks padding and is skipped. One
program per (token, chunk of the Hkv*D row) stores K and V together, so a decode step's
write is a single launch. Slots must be distinct (two writers to one slot would race).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_cache_pair, check_same_device, require, use_triton_for


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    HEAD_DIM: tl.constexpr, ROW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < ROW
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    block = slot // BLOCK_SIZE
    cache_off = block * stride_cb + (slot % BLOCK_SIZE) * stride_ct + head * stride_ch + dim
    k = tl.load(k_ptr + t * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + dim, mask=mask)
    tl.store(kc_ptr + cache_off, k, mask=mask)
    tl.store(vc_ptr + cache_off, v, mask=mask)


def write_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]


def _check_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_indices: bool,
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = check_cache_pair(k_cache, v_cache)
    row_shape = (num_kv_heads, head_dim)
    fast_ok = (
        k.dim() == 3
        and v.dim() == 3
        and k.shape[1:] == row_shape
        and v.shape[1:] == row_shape
        and k.dtype == k_cache.dtype
        and v.dtype == k_cache.dtype
        and k.stride(2) == 1
        and v.stride(2) == 1
        and k.shape[0] == v.shape[0]
        and slot_mapping.dim() == 1
        and slot_mapping.dtype == torch.int64
        and slot_mapping.shape[0] == k.shape[0]
        and k_cache.device == k.device == v.device == slot_mapping.device
    )
    if fast_ok and (not check_indices or slot_mapping.numel() == 0):
        return
    for name, t in (("k", k), ("v", v)):
        require(t.dim() == 3, lambda name=name, t=t: f"{name} must be [T, Hkv, D], got shape {tuple(t.shape)}")
        require(
            tuple(t.shape[1:]) == (num_kv_heads, head_dim),
            lambda name=name, t=t: f"{name} rows are {tuple(t.shape[1:])}, the cache holds ({num_kv_heads}, {head_dim})",
        )
        require(t.dtype == k_cache.dtype, lambda name=name, t=t: f"{name} is {t.dtype} but the cache is {k_cache.dtype}")
        require(t.stride(-1) == 1 or head_dim == 1, lambda name=name, t=t: f"{name} must be contiguous in its head dim")
    require(k.shape[0] == v.shape[0], lambda: f"k has {k.shape[0]} rows, v {v.shape[0]}")
    require(slot_mapping.dim() == 1, lambda: f"slot_mapping must be [T], got {tuple(slot_mapping.shape)}")
    require(slot_mapping.dtype == torch.int64, lambda: f"slot_mapping must be int64, got {slot_mapping.dtype}")
    require(
        slot_mapping.shape[0] == k.shape[0],
        lambda: f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} rows",
    )
    check_same_device(k_cache=k_cache, v_cache=v_cache, k=k, v=v, slot_mapping=slot_mapping)
    if not check_indices or slot_mapping.numel() == 0:
        return
    num_slots = num_blocks * block_size
    valid = slot_mapping[slot_mapping >= 0]
    flags = torch.stack(
        [
            (slot_mapping < -1).any(),
            (slot_mapping >= num_slots).any(),
            torch.tensor(valid.unique().numel() != valid.numel(), device=valid.device),
        ]
    ).tolist()
    require(not flags[0] and not flags[1], lambda: f"slot_mapping values must be -1 or in [0, {num_slots})")
    require(not flags[2], "slot_mapping holds a slot twice")


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    use_triton: bool | None = None,
    check_indices: bool = True,
) -> None:
    """Write k, v [T, Hkv, D] into the cache at slot_mapping [T] int64 (-1 = skip)."""
    _check_write(k_cache, v_cache, k, v, slot_mapping, check_indices)
    if not use_triton_for(use_triton, k_cache):
        write_kv_ref(k_cache, v_cache, k, v, slot_mapping)
        return
    total = k.shape[0]
    if total == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    row = num_kv_heads * head_dim
    chunk = min(triton.next_power_of_2(row), 2048)
    _write_kv_kernel[(total, triton.cdiv(row, chunk))](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim,
        ROW=row,
        BLOCK_SIZE=block_size,
        CHUNK=chunk,
        num_warps=4,
    )
