"""Paged extend (prefill / chunked prefill) attention over a ragged batch.

The new tokens of B sequences are concatenated in q [T, Hq, D]; sequence b owns rows
``cu_q_lens[b] .. cu_q_lens[b+1]`` and its K/V, new tokens included, are already in the
cache, so its query i sits at position ``seq_len - q_len + i`` and sees keys
``(p - W, p]`` (causal; W = sliding window, or all of ``[0, p]``).

One program per (query tile, query head). Query tiles never straddle sequences: a small
``cu_tiles`` prefix sum maps a tile id to its sequence by binary search, so no host sync
is needed to size the grid (its upper bound is ``cdiv(T, BLOCK_M) + B``). Key tiles
entirely visible to every row of the query tile skip the mask; only the window edge and
the diagonal pay for it. Offsets into the cache are int64.
"""

from __future__ import annotations

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

_LOG2E = 1.4426950408889634


@triton.jit
def _extend_tile(
    acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, head_off, pos, lo, hi,
    seq_len, window, scale_log2,
    stride_kb, stride_kt,
    offs_d, d_mask,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        block_ids = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
        tok_off = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt + head_off
        kv_mask = n_valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible = (offs_n[None, :] <= pos[:, None]) & n_valid[None, :]
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_extend_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, cu_q_ptr, cu_tiles_ptr, o_ptr, lse_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    scale_log2, window, batch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if tile >= tl.load(cu_tiles_ptr + batch):
        return
    # Binary search: the sequence b with cu_tiles[b] <= tile < cu_tiles[b + 1].
    lo_b = 0
    hi_b = batch - 1
    while lo_b < hi_b:
        mid = (lo_b + hi_b + 1) // 2
        if tl.load(cu_tiles_ptr + mid) <= tile:
            lo_b = mid
        else:
            hi_b = mid - 1
    b = lo_b
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    seq_len = tl.load(lens_ptr + b)
    ctx = seq_len - q_len
    # Within a sequence the last tiles (the most keys) go first: shorter tail under causality.
    first_tile = tl.load(cu_tiles_ptr + b)
    num_tiles = tl.load(cu_tiles_ptr + b + 1) - first_tile
    m0 = (num_tiles - 1 - (tile - first_tile)) * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    # Padding rows take the last real row's position so their softmax stays finite.
    pos = ctx + tl.minimum(offs_m, q_len - 1)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    pos_first = ctx + m0
    pos_last = ctx + tl.minimum(m0 + BLOCK_M, q_len) - 1
    hi = pos_last + 1
    if HAS_WINDOW:
        lo = tl.maximum(pos_first - window + 1, 0)
        full_lo = tl.maximum(pos_last - window + 1, 0)
    else:
        lo = 0
        full_lo = 0
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, hi)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum(((pos_first + 1) // BLOCK_N) * BLOCK_N, full_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = (head // GROUP).to(tl.int64) * stride_kh
    # Window edge (masked), the fully visible middle (unmasked), the diagonal (masked).
    acc, m_i, l_i = _extend_tile(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, head_off, pos, lo, full_lo,
        seq_len, window, scale_log2, stride_kb, stride_kt, offs_d, d_mask,
        True, HAS_WINDOW, BLOCK_SIZE, BLOCK_N, UPCAST, DOT_PRECISION,
    )
    acc, m_i, l_i = _extend_tile(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, head_off, pos, full_lo, full_hi,
        seq_len, window, scale_log2, stride_kb, stride_kt, offs_d, d_mask,
        False, HAS_WINDOW, BLOCK_SIZE, BLOCK_N, UPCAST, DOT_PRECISION,
    )
    acc, m_i, l_i = _extend_tile(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, head_off, pos, full_hi, hi,
        seq_len, window, scale_log2, stride_kb, stride_kt, offs_d, d_mask,
        True, HAS_WINDOW, BLOCK_SIZE, BLOCK_N, UPCAST, DOT_PRECISION,
    )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(
        o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + rows * stride_lt + head * stride_lh, lse, mask=m_valid)


def paged_extend_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per sequence, gather its pages and attend with a causal mask."""
    total, num_q_heads, head_dim = q.shape
    scale = default_scale(scale, head_dim)
    out = torch.empty_like(q)
    lse = torch.empty((total, num_q_heads), dtype=torch.float32, device=q.device)
    block_size = k_cache.shape[1]
    cu = cu_q_lens.tolist()
    for b in range(len(cu) - 1):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        length = int(seq_lens[b])
        ids = block_tables[b, : -(-length // block_size)]
        k = gather_tokens(k_cache, ids, length)
        v = gather_tokens(v_cache, ids, length)
        pos = torch.arange(length - (end - start), length, device=q.device)[:, None]
        keys = torch.arange(length, device=q.device)[None, :]
        mask = keys <= pos
        if sliding_window is not None:
            mask = mask & (keys > pos - sliding_window)
        o, s = attention_ref(q[start:end], k, v, mask, scale)
        out[start:end] = o.to(q.dtype)
        lse[start:end] = s
    return (out, lse) if return_lse else out


def _check_cu_q_lens(
    cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, batch: int, total: int, check_indices: bool
) -> None:
    require(cu_q_lens.dim() == 1, lambda: f"cu_q_lens must be [B+1], got shape {tuple(cu_q_lens.shape)}")
    require(cu_q_lens.dtype == torch.int32, lambda: f"cu_q_lens must be int32, got {cu_q_lens.dtype}")
    require(
        cu_q_lens.shape[0] == batch + 1,
        lambda: f"cu_q_lens has {cu_q_lens.shape[0]} entries, expected B+1 = {batch + 1}",
    )
    require(cu_q_lens.stride(0) == 1 or batch == 0, "cu_q_lens must be contiguous")
    if not check_indices:
        return
    q_lens = cu_q_lens[1:].long() - cu_q_lens[:-1].long()
    flags = torch.stack(
        [
            cu_q_lens[0] != 0,
            cu_q_lens[-1] != total,
            (q_lens < 0).any() if batch else cu_q_lens[0] != 0,
            (q_lens > seq_lens.long()).any() if batch else cu_q_lens[0] != 0,
        ]
    ).tolist()
    require(not flags[0], "cu_q_lens[0] must be 0")
    require(not flags[1], lambda: f"cu_q_lens[-1] must equal the number of q rows ({total})")
    require(not flags[2], "cu_q_lens must be non-decreasing")
    require(not flags[3], "a sequence's q_len exceeds its seq_len")


def paged_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
    use_triton: bool | None = None,
    check_indices: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a ragged batch of new tokens over their sequences' pages.

    q [T, Hq, D]; cu_q_lens [B+1] int32; seq_lens [B] int32 (tokens of each sequence
    including its new ones, whose K/V are already written). Returns out [T, Hq, D] and,
    with ``return_lse``, lse [T, Hq] fp32 (natural log).
    """
    num_blocks, block_size, num_kv_heads, head_dim = check_cache_pair(k_cache, v_cache)
    num_q_heads, group = check_query(q, k_cache)
    check_same_device(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_q_lens=cu_q_lens,
        seq_lens=seq_lens,
    )
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_page_tables(block_tables, seq_lens, batch, num_blocks, block_size, check_indices)
    total = q.shape[0]
    _check_cu_q_lens(cu_q_lens, seq_lens, batch, total, check_indices)
    require(q.stride(-1) == 1, "q must be contiguous in its head dim")
    require(
        sliding_window is None or (isinstance(sliding_window, int) and sliding_window >= 1),
        lambda: f"sliding_window must be None or an int >= 1, got {sliding_window!r}",
    )
    scale = default_scale(scale, head_dim)
    out = check_out(out, tuple(q.shape), q)
    if not use_triton_for(use_triton, q):
        result = paged_extend_ref(
            q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens,
            scale=scale, sliding_window=sliding_window, return_lse=True,
        )
        out.copy_(result[0])
        return (out, result[1]) if return_lse else out
    lse = torch.empty((total, num_q_heads), dtype=torch.float32, device=q.device)
    if total == 0 or batch == 0:
        return (out, lse) if return_lse else out

    launch_extend(
        q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, out, lse, scale, sliding_window
    )
    return (out, lse) if return_lse else out


def extend_config(head_dim: int, itemsize: int) -> dict[str, int]:
    """Query rows and keys per tile, warps and pipeline depth (H100 sweep in the notes)."""
    if INTERPRET:
        return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    if itemsize == 4:  # fp32 tiles take twice the shared memory
        return {"block_m": 64, "block_n": 32 if head_dim <= 128 else 16, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}
    if head_dim <= 128:
        return {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 4}
    return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}


def launch_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    config: dict[str, int] | None = None,
) -> None:
    """Launch on already validated inputs."""
    total, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    block_size = k_cache.shape[1]
    config = config or extend_config(head_dim, q.element_size())
    error: OutOfResources | None = None
    for cfg in fallback_configs(config, ("block_n", "block_m")):
        block_m = cfg["block_m"]
        q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
        cu_tiles = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        torch.cumsum((q_lens + block_m - 1) // block_m, dim=0, dtype=torch.int32, out=cu_tiles[1:])
        grid = (triton.cdiv(total, block_m) + batch, num_q_heads)
        try:
            _paged_extend_kernel[grid](
                q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, cu_tiles, out, lse,
                q.stride(0), q.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                block_tables.stride(0),
                out.stride(0), out.stride(1),
                lse.stride(0), lse.stride(1),
                scale * _LOG2E, sliding_window or 0, batch,
                GROUP=num_q_heads // k_cache.shape[2],
                HEAD_DIM=head_dim,
                D_PAD=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size,
                BLOCK_M=block_m,
                BLOCK_N=cfg["block_n"],
                HAS_WINDOW=sliding_window is not None,
                UPCAST=INTERPRET and q.dtype != torch.float32,
                DOT_PRECISION=dot_precision(q.dtype),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
            return
        except OutOfResources as exc:
            error = exc
    raise error or RuntimeError("no extend config to launch")
