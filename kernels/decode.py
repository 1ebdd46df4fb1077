"""Paged decode attention: one new query token per sequence over its cached pages.

Split-KV (flash-decoding): program (b, kv_head, split) reads its split's pages once for
all ``Hq // Hkv`` query heads of that KV head (GQA/MQA share each page read), keeps an
online softmax in fp32 and writes a partial (out, lse); the merge kernel then reduces the
splits. With one split the first pass writes the final output directly. The split count
comes from the batch, the block-table width and the SM count so that short batches still
fill the GPU. Cache offsets are computed in int64 (block_id * block_stride overflows 32
bits on large pools).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._common import (
    INTERPRET,
    attention_ref,
    check_cache_pair,
    check_out,
    check_page_tables,
    check_query,
    check_same_device,
    default_scale,
    dot_precision,
    fallback_configs,
    gather_tokens,
    require,
    use_triton_for,
)
from .decode_cpu import paged_decode_batched
from .merge import merge_splits

_LOG2E = 1.4426950408889634
# A split shorter than this costs more in its partial write and reduce than it saves.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 4
# (sequence, KV head) programs per SM from which a decode is not split at all.
_FULL_GRID_PER_SM = 2


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale_log2, tokens_per_split,
    GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh.to(tl.int64) * stride_kh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block_ids = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        tok_off = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt + head_off
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_rows = o_ptr + b.to(tl.int64) * stride_ob + heads * stride_oh + split * stride_os
    tl.store(
        o_rows[:, None] + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_tokens: int, num_sms: int) -> int:
    """Split count for ``batch * num_kv_heads`` (sequence, KV head) programs.

    Few programs: split each so that about four per SM run in one wave (a fifth program on
    some SMs would double their time). One to two programs per SM: one extra split evens
    the last wave out for sequences of 1K tokens and up. Two per SM or more: the grid is
    full without splitting, so no split, and no merge launch (a decode step of a full
    batch is bound by host launch cost, and a split adds a launch per layer). Splits stay
    at least ``_MIN_TOKENS_PER_SPLIT`` long.
    """
    programs = max(batch * num_kv_heads, 1)
    cap = max(1, max_tokens // _MIN_TOKENS_PER_SPLIT)
    if programs >= _FULL_GRID_PER_SM * num_sms:
        return 1
    if programs >= num_sms:
        return min(2, cap) if max_tokens >= 1024 else 1
    return max(1, min((_PROGRAMS_PER_SM * num_sms) // programs, cap, _MAX_SPLITS))


def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: gather each sequence's pages, attend in fp32."""
    batch, num_q_heads, head_dim = q.shape
    scale = default_scale(scale, head_dim)
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32, device=q.device)
    block_size = k_cache.shape[1]
    for b in range(batch):
        length = int(seq_lens[b])
        ids = block_tables[b, : -(-length // block_size)]
        k = gather_tokens(k_cache, ids, length)
        v = gather_tokens(v_cache, ids, length)
        o, s = attention_ref(q[b : b + 1], k, v, None, scale)
        out[b] = o[0].to(q.dtype)
        lse[b] = s[0]
    return (out, lse) if return_lse else out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    use_triton: bool | None = None,
    check_indices: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over paged KV.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] (any block/token/head
    strides, contiguous head dim); block_tables [B, max_blocks] int32; seq_lens [B] int32
    (>= 1). Returns out [B, Hq, D] in q's dtype and, with ``return_lse``, lse [B, Hq] fp32
    (natural log). ``out`` may be given as a preallocated contiguous buffer. CPU tensors
    take the batched torch path (``decode_cpu.py``) rather than the per-sequence reference.
    """
    num_blocks, block_size, num_kv_heads, head_dim = check_cache_pair(k_cache, v_cache)
    num_q_heads, group = check_query(q, k_cache)
    check_same_device(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens
    )
    batch = q.shape[0]
    check_page_tables(block_tables, seq_lens, batch, num_blocks, block_size, check_indices)
    require(q.stride(-1) == 1, "q must be contiguous in its head dim")
    require(num_splits is None or num_splits >= 1, lambda: f"num_splits must be >= 1, got {num_splits}")
    scale = default_scale(scale, head_dim)
    out = check_out(out, tuple(q.shape), q)
    triton_path = use_triton_for(use_triton, q)
    if not triton_path:
        # The batched path is for CPU tensors; CUDA ones with use_triton=False keep the
        # reference.
        torch_path = paged_decode_batched if q.device.type == "cpu" else paged_decode_ref
        result = torch_path(
            q, k_cache, v_cache, block_tables, seq_lens, scale=scale, return_lse=True
        )
        out.copy_(result[0])
        return (out, result[1]) if return_lse else out
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return (out, lse) if return_lse else out

    launch_decode(q, k_cache, v_cache, block_tables, seq_lens, out, lse, scale, num_splits)
    return (out, lse) if return_lse else out


def decode_config(head_dim: int, itemsize: int, num_splits: int) -> dict[str, int]:
    """Tile and launch settings (tokens per step, warps, pipeline depth).

    Measured on an H100 (benchmarks/NOTES-kernels.md): while few programs carry long
    splits, 32-token steps keep more programs resident; full-batch launches prefer 64.
    """
    block_n = 32 if num_splits > 2 or head_dim * itemsize > 256 else 64
    return {"block_n": block_n, "num_warps": 4, "num_stages": 3}


def launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: dict[str, int] | None = None,
) -> int:
    """Launch on already validated inputs; returns the split count used."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_tokens = max(block_tables.shape[1] * block_size, 1)
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 4
        num_splits = choose_num_splits(batch, num_kv_heads, max_tokens, num_sms)
    config = config or decode_config(head_dim, q.element_size(), num_splits)
    tokens_per_split = triton.cdiv(triton.cdiv(max_tokens, num_splits), config["block_n"])
    tokens_per_split *= config["block_n"]
    num_splits = triton.cdiv(max_tokens, tokens_per_split)
    grid = (batch, num_kv_heads, num_splits)
    if num_splits == 1:
        part_out, part_lse, stride_os = out, lse, 0
    else:
        part_out = torch.empty(
            (batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        stride_os = part_out.stride(2)
    error: OutOfResources | None = None
    for cfg in fallback_configs(config, ("block_n",)):
        try:
            _paged_decode_kernel[grid](
                q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
                q.stride(0), q.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                block_tables.stride(0),
                part_out.stride(0), part_out.stride(1), stride_os,
                part_lse.stride(0), part_lse.stride(1),
                scale * _LOG2E, tokens_per_split,
                GROUP=group,
                G_PAD=max(16, triton.next_power_of_2(group)),
                HEAD_DIM=head_dim,
                D_PAD=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size,
                BLOCK_N=cfg["block_n"],
                UPCAST=INTERPRET and q.dtype != torch.float32,
                DOT_PRECISION=dot_precision(q.dtype),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
            break
        except OutOfResources as exc:
            error = exc
    else:
        raise error or RuntimeError("no decode config to launch")
    if num_splits > 1:
        merge_splits(part_out, part_lse, out, lse)
    return num_splits
