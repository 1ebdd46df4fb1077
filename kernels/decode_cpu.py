"""Batched paged decode in torch: the CPU path of ``paged_decode``.

The reference (``paged_decode_ref``) attends one sequence at a time, so on CPU a decode
step costs per-sequence Python and dispatch overhead. Here a group of sequences is
gathered with one indexing op into a padded ``[n * Hkv, tokens, D]`` fp32 tensor,
positions at or past a sequence's length are masked, and scores, softmax and output are
two batched matmuls. Same contract and math as the reference: out in q's dtype, lse fp32
in natural log, query head ``h`` reading KV head ``h // (Hq // Hkv)``. Block-table entries
past a sequence's own pages may hold anything: their values are never used.

Memory is bounded: when the padded batch would exceed ``chunk_elements`` cache elements
(per K or V), sequences are sorted by length and attended in chunks that stay under it, so
one long sequence does not pad every short one to its length. A single sequence larger
than the budget forms a chunk of its own.

The gathered pages live in per-thread scratch buffers reused from call to call: freshly
allocated, these megabyte-sized tensors went back to the OS on free and were faulted in
again on every step, which cost more than the attention itself. A thread keeps its largest
chunk's buffers, four of at most ``chunk_elements`` (K and V as gathered and in fp32: 64 MiB
at the default for an fp32 cache), more only after a single sequence over the budget.
"""

from __future__ import annotations

import math
import threading

import torch

from ._common import default_scale

# 16 MiB of fp32 per gathered K or V: large enough that a chunk's fixed costs vanish.
CHUNK_ELEMENTS = 2**22


class _Scratch(threading.local):
    """One thread's reusable buffers, by purpose and dtype; grown, never shrunk."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            # A normal tensor even when first taken under inference mode, so that calls
            # outside it may write it too.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype)
            self.buffers[(name, dtype)] = buf
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def _gather(cache: torch.Tensor, ids: torch.Tensor, n: int, tokens: int, name: str) -> torch.Tensor:
    """Pages ``ids`` (``n`` sequences' worth, row-major) as fp32 [n * Hkv, tokens, D]."""
    _, _, num_kv_heads, head_dim = cache.shape
    pages = _SCRATCH.take(f"{name}_pages", (ids.numel(), *cache.shape[1:]), cache.dtype)
    torch.index_select(cache, 0, ids, out=pages)
    heads_first = _SCRATCH.take(name, (n, num_kv_heads, tokens, head_dim), torch.float32)
    # One copy does both the relayout and the upcast.
    heads_first.copy_(pages.view(n, tokens, num_kv_heads, head_dim).transpose(1, 2))
    return heads_first.view(n * num_kv_heads, tokens, head_dim)


def _attend_chunk(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows q [n, Hq, D] over their pages, padded to ``max_len``; fp32 out and lse."""
    n, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    num_used = -(-max_len // block_size)
    tokens = num_used * block_size
    lens = seq_lens.to(torch.int64)
    # A shorter sequence's table entries past its own pages may be garbage: read block 0
    # there instead (masked out below like any padding).
    own_page = torch.arange(num_used) < (lens[:, None] + block_size - 1) // block_size
    ids = block_tables[:, :num_used].long().masked_fill_(~own_page, 0).reshape(-1)
    k = _gather(k_cache, ids, n, tokens, "k")
    v = _gather(v_cache, ids, n, tokens, "v")
    qg = q.float().reshape(n * num_kv_heads, group, head_dim)
    scores = torch.bmm(qg, k.transpose(1, 2)).mul_(scale).view(n, num_kv_heads, group, tokens)
    past_end = torch.arange(tokens) >= lens[:, None]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A row without keys (length 0, only with unchecked inputs) gets out 0 and lse -inf.
    probs = torch.exp(scores - lse[..., None].clamp(min=-1e30))
    out = torch.bmm(probs.view(n * num_kv_heads, group, tokens), v)
    return out.view(n, num_q_heads, head_dim), lse.view(n, num_q_heads)


def plan_chunks(
    seq_lens: list[int], block_size: int, token_elements: int, chunk_elements: int
) -> list[list[int]]:
    """Rows of each chunk. All rows in order when their padded K fits ``chunk_elements``;
    otherwise longest first, each chunk as many rows as fit when padded to its first
    (longest) row's pages, and at least one."""

    def padded(count: int, length: int) -> int:
        return count * -(-length // block_size) * block_size * token_elements

    batch = len(seq_lens)
    if padded(batch, max(seq_lens, default=0)) <= chunk_elements:
        return [list(range(batch))] if batch else []
    order = sorted(range(batch), key=seq_lens.__getitem__, reverse=True)
    chunks: list[list[int]] = []
    start = 0
    while start < batch:
        count = max(1, chunk_elements // max(padded(1, seq_lens[order[start]]), 1))
        chunks.append(order[start : start + count])
        start += count
    return chunks


def paged_decode_batched(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``paged_decode_ref``'s contract for CPU tensors, batched over sequences.

    Inputs are taken as ``paged_decode`` checked them; ``chunk_elements`` bounds the padded
    K (and V) of one chunk, in elements.
    """
    batch, num_q_heads, head_dim = q.shape
    scale = default_scale(scale, head_dim)
    _, block_size, num_kv_heads, _ = k_cache.shape
    lens = seq_lens.tolist()
    chunks = plan_chunks(lens, block_size, num_kv_heads * head_dim, chunk_elements)
    if len(chunks) <= 1:
        max_len = max(lens, default=0)
        out, lse = _attend_chunk(q, k_cache, v_cache, block_tables, seq_lens, max_len, scale)
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out

    out = torch.empty_like(q)
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32)
    for chunk in chunks:
        rows = torch.tensor(chunk, dtype=torch.int64)
        o, s = _attend_chunk(
            q[rows], k_cache, v_cache, block_tables[rows], seq_lens[rows], lens[chunk[0]], scale
        )
        out[rows] = o.to(q.dtype)
        lse[rows] = s
    return (out, lse) if return_lse else out
