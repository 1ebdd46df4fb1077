"""Merging partial attention results by their log-sum-exp.

Attention over a union of disjoint key sets is the LSE-weighted mix of the attention over
each set: ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = log sum_i exp(lse_i)``.
This serves the decode reduce (one part per KV split), attention over pages split between
tiers, and a sequence split across workers. ``lse = -inf`` marks a part with no keys; when
every part is empty the merged row is 0 with ``lse = -inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_dtype, check_same_device, require, use_triton_for


@triton.jit
def _merge_attn_states_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, l_ptr,
    stride_oa_n, stride_oa_h, stride_ob_n, stride_ob_h, stride_o_n, stride_o_h,
    stride_la_n, stride_lb_n, stride_l_n,
    num_heads, head_dim,
    D_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // num_heads
    h = row % num_heads
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    lse_a = tl.load(la_ptr + n * stride_la_n + h)
    lse_b = tl.load(lb_ptr + n * stride_lb_n + h)
    m = tl.maximum(lse_a, lse_b)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)
    wa = tl.exp2((lse_a - m_safe) * 1.4426950408889634)
    wb = tl.exp2((lse_b - m_safe) * 1.4426950408889634)
    total = wa + wb
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    a = tl.load(oa_ptr + n * stride_oa_n + h * stride_oa_h + offs_d, mask=d_mask, other=0.0)
    b = tl.load(ob_ptr + n * stride_ob_n + h * stride_ob_h + offs_d, mask=d_mask, other=0.0)
    out = (a.to(tl.float32) * (wa * inv) + b.to(tl.float32) * (wb * inv))
    tl.store(o_ptr + n * stride_o_n + h * stride_o_h + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)
    lse = tl.where(empty, float("-inf"), m_safe + tl.log2(tl.where(empty, 1.0, total)) * 0.6931471805599453)
    tl.store(l_ptr + n * stride_l_n + h, lse)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr, part_l_ptr, o_ptr, l_ptr,
    stride_po_row, stride_po_s, stride_pl_row,
    stride_o_b, stride_o_h, stride_l_b,
    num_heads, num_splits, head_dim,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Reduce of the split-KV decode: parts [rows, S, D] fp32 and lse [rows, S] -> out, lse."""
    row = tl.program_id(0).to(tl.int64)
    b = row // num_heads
    h = row % num_heads
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim
    lse = tl.load(part_l_ptr + row * stride_pl_row + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)
    w = tl.exp2((lse - m_safe) * 1.4426950408889634)
    total = tl.sum(w, axis=0)
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    parts = tl.load(
        part_o_ptr + row * stride_po_row + offs_s[:, None] * stride_po_s + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(parts * (w * inv)[:, None], axis=0)
    tl.store(o_ptr + b * stride_o_b + h * stride_o_h + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)
    if WRITE_LSE:
        lse_out = tl.where(empty, float("-inf"), m_safe + tl.log2(tl.where(empty, 1.0, total)) * 0.6931471805599453)
        tl.store(l_ptr + b * stride_l_b + h, lse_out)


def merge_attn_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    empty = torch.isneginf(lse)
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a.float() - lse_safe).masked_fill(empty, 0.0)
    wb = torch.exp(lse_b.float() - lse_safe).masked_fill(empty, 0.0)
    out = out_a.float() * wa[..., None] + out_b.float() * wb[..., None]
    return out.to(out_a.dtype), lse


def _check_merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        require(t.dim() == 3, lambda name=name, t=t: f"{name} must be [N, H, D], got shape {tuple(t.shape)}")
        check_dtype(name, t, SUPPORTED_DTYPES)
        require(t.stride(-1) == 1 or t.shape[-1] == 1, lambda name=name, t=t: f"{name} must be contiguous in its last dim")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        require(t.dim() == 2, lambda name=name, t=t: f"{name} must be [N, H], got shape {tuple(t.shape)}")
        require(t.dtype == torch.float32, lambda name=name, t=t: f"{name} must be float32, got {t.dtype}")
        require(t.stride(-1) == 1 or t.shape[-1] == 1, lambda name=name, t=t: f"{name} must be contiguous in its last dim")
    require(out_a.shape == out_b.shape, lambda: f"out_a {tuple(out_a.shape)} != out_b {tuple(out_b.shape)}")
    require(out_a.dtype == out_b.dtype, lambda: f"out_a is {out_a.dtype}, out_b {out_b.dtype}")
    require(
        lse_a.shape == out_a.shape[:2] and lse_b.shape == out_a.shape[:2],
        lambda: f"lse shapes {tuple(lse_a.shape)}, {tuple(lse_b.shape)} must be {tuple(out_a.shape[:2])}",
    )
    check_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def merge_attn_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results over disjoint key sets; returns (out [N,H,D], lse [N,H])."""
    _check_merge(out_a, lse_a, out_b, lse_b)
    if not use_triton_for(use_triton, out_a):
        return merge_attn_states_ref(out_a, lse_a, out_b, lse_b)
    n, h, d = out_a.shape
    out = torch.empty((n, h, d), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((n, h), dtype=torch.float32, device=out_a.device)
    if n * h == 0:
        return out, lse
    _merge_attn_states_kernel[(n * h,)](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
        out.stride(0), out.stride(1),
        lse_a.stride(0), lse_b.stride(0), lse.stride(0),
        h, d,
        D_PAD=triton.next_power_of_2(d),
    )
    return out, lse


def merge_splits(
    part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None
) -> None:
    """Launch the split reduce: part_out [B, H, S, D] fp32, part_lse [B, H, S] -> out [B, H, D]."""
    b, h, s, d = part_out.shape
    if b * h == 0:
        return
    _merge_splits_kernel[(b * h,)](
        part_out, part_lse, out, lse if lse is not None else part_lse,
        part_out.stride(1), part_out.stride(2), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0,
        h, s, d,
        S_PAD=max(triton.next_power_of_2(s), 2),
        D_PAD=triton.next_power_of_2(d),
        WRITE_LSE=lse is not None,
    )
