"""Shared checks and dispatch for the kernel families.

Every public kernel function validates its inputs here before anything is launched, so a
bad call raises ``ValueError`` with a message naming the argument and never reaches a
kernel that would read or write out of bounds. Value checks (block ids, lengths, slots)
need the index tensors' contents; on CUDA that costs one device synchronisation, which a
caller that builds its indices on the host and has checked them can skip with
``check_indices=False``.

The reference attention here is the single oracle for decode and extend: fp32 math,
natural-log LSE, query head ``h`` reading KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Triton reads the variable when kernels are decorated, so it is read once here too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return INTERPRET


def fallback_configs(config: dict[str, int], tile_keys: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """The config, then ever smaller ones (one pipeline stage, then halved tiles), for GPUs
    whose shared memory cannot hold the preferred tiles."""
    yield config
    cfg = dict(config)
    while True:
        if cfg["num_stages"] > 1:
            cfg["num_stages"] = 1
        else:
            key = max(tile_keys, key=lambda k: cfg[k])
            if cfg[key] <= 16:
                return
            cfg[key] //= 2
        yield dict(cfg)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 accuracy (three tf32 products); half types use tensor cores."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if interpreting() else "tf32x3"


def require(cond: bool, message: str | Callable[[], str]) -> None:
    """Raise ValueError unless ``cond``; a callable message is only formatted on failure
    (these checks run on every decode step, so the happy path must stay cheap)."""
    if not cond:
        raise ValueError(message() if callable(message) else message)


def use_triton_for(use_triton: bool | None, *tensors: torch.Tensor) -> bool:
    """Decide the path: CUDA tensors take Triton, CPU tensors the reference.

    ``use_triton=True`` on CPU tensors is only meaningful under the interpreter.
    """
    on_cuda = any(t.is_cuda for t in tensors)
    if use_triton is None:
        return on_cuda
    if use_triton and not on_cuda and not interpreting():
        raise ValueError("use_triton=True on CPU tensors needs TRITON_INTERPRET=1")
    return bool(use_triton)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    items = list(tensors.items())
    first = items[0][1]
    # Cheap path for the per-step case: all on one CUDA device (ints, no device objects).
    if first.is_cuda:
        index = first.get_device()
        if all(t.is_cuda and t.get_device() == index for _, t in items):
            return first.device
    device = first.device
    for name, t in items[1:]:
        require(
            t.device == device,
            lambda name=name, t=t: f"{name} is on {t.device} but {items[0][0]} is on {device}; all must share a device",
        )
    return device


def check_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    require(t.dtype in dtypes, lambda: f"{name} must have dtype in {dtypes}, got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    require(t.dim() == ndim, lambda: f"{name} must be {what} ({ndim}-D), got shape {tuple(t.shape)}")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a layer's K and V views; returns (num_blocks, block_size, num_kv_heads, head_dim)."""
    # Fast path first: these checks run on every decode step; the messages come below.
    shape, stride = k_cache.shape, k_cache.stride()
    if (
        len(shape) == 4
        and shape == v_cache.shape
        and stride == v_cache.stride()
        and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in SUPPORTED_DTYPES
        and stride[3] == 1
        and min(stride) >= 0
        and min(shape[1:]) > 0
    ):
        return shape[0], shape[1], shape[2], shape[3]
    check_ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_ndim("v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    require(
        k_cache.shape == v_cache.shape,
        lambda: f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape",
    )
    check_dtype("k_cache", k_cache, SUPPORTED_DTYPES)
    require(k_cache.dtype == v_cache.dtype, lambda: f"k_cache is {k_cache.dtype}, v_cache {v_cache.dtype}")
    require(
        k_cache.stride() == v_cache.stride(),
        lambda: f"k_cache strides {k_cache.stride()} differ from v_cache strides {v_cache.stride()}",
    )
    require(
        k_cache.stride(-1) == 1 or k_cache.shape[-1] == 1,
        lambda: f"the head dimension of the caches must be contiguous, strides {k_cache.stride()}",
    )
    require(min(k_cache.stride()) >= 0, lambda: f"negative cache strides {k_cache.stride()}")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    require(block_size > 0 and num_kv_heads > 0 and head_dim > 0, "empty cache dimensions")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_query(q: torch.Tensor, k_cache: torch.Tensor, name: str = "q") -> tuple[int, int]:
    """Validate q [rows, Hq, D] against the cache; returns (num_q_heads, group size)."""
    q_shape, cache_shape = q.shape, k_cache.shape
    if (
        len(q_shape) == 3
        and q.dtype == k_cache.dtype
        and q_shape[2] == cache_shape[3]
        and q_shape[1] > 0
        and q_shape[1] % cache_shape[2] == 0
    ):
        return q_shape[1], q_shape[1] // cache_shape[2]
    check_ndim(name, q, 3, "[rows, num_q_heads, head_dim]")
    require(q.dtype == k_cache.dtype, lambda: f"{name} is {q.dtype} but the cache is {k_cache.dtype}")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    require(
        head_dim == k_cache.shape[3],
        lambda: f"{name} head_dim {head_dim} != cache head_dim {k_cache.shape[3]}",
    )
    require(
        num_q_heads > 0 and num_q_heads % num_kv_heads == 0,
        lambda: f"num_q_heads {num_q_heads} must be a positive multiple of num_kv_heads {num_kv_heads}",
    )
    return num_q_heads, num_q_heads // num_kv_heads


def check_page_tables(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    batch: int,
    num_blocks: int,
    block_size: int,
    check_indices: bool,
) -> None:
    """Shapes of the page tables always; their values (one sync on CUDA) when asked."""
    fast_ok = (
        block_tables.dim() == 2
        and seq_lens.dim() == 1
        and block_tables.dtype == torch.int32
        and seq_lens.dtype == torch.int32
        and block_tables.shape[0] == batch
        and seq_lens.shape[0] == batch
        and (block_tables.stride(1) == 1 or block_tables.shape[1] <= 1)
    )
    if fast_ok and (not check_indices or batch == 0):
        return
    check_ndim("block_tables", block_tables, 2, "[batch, max_blocks]")
    check_ndim("seq_lens", seq_lens, 1, "[batch]")
    require(block_tables.dtype == torch.int32, lambda: f"block_tables must be int32, got {block_tables.dtype}")
    require(seq_lens.dtype == torch.int32, lambda: f"seq_lens must be int32, got {seq_lens.dtype}")
    require(
        block_tables.shape[0] == batch and seq_lens.shape[0] == batch,
        lambda: f"batch mismatch: q has {batch} rows/sequences, block_tables {tuple(block_tables.shape)}, "
        f"seq_lens {tuple(seq_lens.shape)}",
    )
    require(
        block_tables.stride(-1) == 1 or block_tables.shape[-1] <= 1,
        "block_tables rows must be contiguous",
    )
    if not check_indices or batch == 0:
        return
    max_blocks = block_tables.shape[1]
    needed = (seq_lens.long() + block_size - 1) // block_size
    used = torch.arange(max_blocks, device=block_tables.device)[None, :] < needed[:, None]
    bad_ids = used & ((block_tables < 0) | (block_tables >= num_blocks))
    flags = torch.stack(
        [(seq_lens < 1).any(), (needed > max_blocks).any(), bad_ids.any()]
    ).tolist()
    require(not flags[0], "every seq_len must be >= 1")
    require(
        not flags[1],
        lambda: f"a seq_len exceeds the block table capacity ({max_blocks} blocks of {block_size})",
    )
    require(not flags[2], lambda: f"block_tables holds block ids outside [0, {num_blocks}) in used entries")


def default_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    require(math.isfinite(scale), lambda: f"scale must be finite, got {scale}")
    return float(scale)


def gather_tokens(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a sequence's pages: [length, Hkv, D]."""
    pages = cache[block_ids.long()]
    return pages.reshape(-1, cache.shape[2], cache.shape[3])[:length]


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32: q [n, Hq, D], k/v [L, Hkv, D], mask [n, L] (True = visible).

    Returns out [n, Hq, D] fp32 and lse [n, Hq] fp32; a row with no visible key gets out 0
    and lse -inf.
    """
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q.float().reshape(n, num_kv_heads, group, head_dim)
    scores = torch.einsum("nhgd,lhd->nhgl", qg, k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=-1e30))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("nhgl,lhd->nhgd", probs, v.float())
    return out.reshape(n, num_q_heads, head_dim), lse.reshape(n, num_q_heads)


def check_out(
    out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, name: str = "out"
) -> torch.Tensor:
    """Use a caller's output buffer (checked) or allocate one."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    require(tuple(out.shape) == shape, lambda: f"{name} must have shape {shape}, got {tuple(out.shape)}")
    require(out.dtype == like.dtype, lambda: f"{name} must be {like.dtype}, got {out.dtype}")
    require(out.device == like.device, lambda: f"{name} must be on {like.device}, got {out.device}")
    require(out.is_contiguous(), lambda: f"{name} must be contiguous")
    return out
