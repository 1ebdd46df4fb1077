"""Whole-block copy within a pool (copy-on-write), all layers at once.

A block of the block-major pool is one contiguous run of bytes, so a copy is a flat word
copy: the work is (pair, chunk) items of CHUNK words of one block. The same kernel serves
swap (swap.py), where source and destination are different pools, one of them pinned host
memory reached through unified addressing, and block transfers between workers
(``copy_rows``: gathering blocks into a staging buffer and scattering them back). By
default every item is a program of its own; with ``programs`` a fixed number of programs
loop over the items, which leaves the other SMs to kernels running beside the copy (NCCL's
on the transfer path). Destinations must be distinct and must not also be sources, so the
order in which items run never matters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import require, use_triton_for

# Words moved by one program: 16 KiB of int64 keeps many loads in flight per SM.
_CHUNK = 2048
_NUM_WARPS = 4


@triton.jit
def _copy_blocks_kernel(
    src_ptr,
    dst_ptr,
    pairs_ptr,
    block_words,
    stride_pair,
    num_items,
    chunks_per_block,
    CHUNK: tl.constexpr,
):
    # Item i is chunk (i % chunks_per_block) of pair (i // chunks_per_block).
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        pair = (item // chunks_per_block).to(tl.int64)
        src = tl.load(pairs_ptr + pair * stride_pair)
        dst = tl.load(pairs_ptr + pair * stride_pair + 1)
        offs = (item % chunks_per_block).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < block_words
        words = tl.load(src_ptr + src * block_words + offs, mask=mask)
        tl.store(dst_ptr + dst * block_words + offs, words, mask=mask)


def as_words(pool: torch.Tensor) -> torch.Tensor:
    """The pool as [num_blocks, words] of the widest integer type that divides a block."""
    flat = pool.view(pool.shape[0], -1).view(torch.uint8)
    block_bytes = flat.shape[1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if block_bytes % size == 0 and flat.data_ptr() % size == 0:
            return flat.view(dtype)
    return flat


def launch_block_copy(
    src_words: torch.Tensor,
    dst_words: torch.Tensor,
    pairs: torch.Tensor,
    programs: int | None = None,
) -> None:
    """Copy block pairs[i, 0] of src to block pairs[i, 1] of dst (both [N, words], same
    type), with one program per item or, given ``programs``, at most that many."""
    num_pairs, block_words = pairs.shape[0], src_words.shape[1]
    if num_pairs == 0 or block_words == 0:
        return
    chunks = triton.cdiv(block_words, _CHUNK)
    num_items = num_pairs * chunks
    grid = (num_items if programs is None else max(1, min(programs, num_items)),)
    _copy_blocks_kernel[grid](
        src_words, dst_words, pairs, block_words, pairs.stride(0), num_items, chunks,
        CHUNK=_CHUNK, num_warps=_NUM_WARPS,
    )  # fmt: skip


def check_pairs(
    pairs: torch.Tensor, num_src: int, num_dst: int, check_indices: bool, same_pool: bool
) -> None:
    require(
        pairs.dim() == 2 and pairs.shape[1] == 2,
        lambda: f"pairs must be [P, 2], got {tuple(pairs.shape)}",
    )
    require(pairs.dtype == torch.int64, lambda: f"pairs must be int64, got {pairs.dtype}")
    require(pairs.stride(1) == 1 or pairs.shape[0] == 0, "pairs rows must be contiguous")
    if not check_indices or pairs.shape[0] == 0:
        return
    host = pairs.cpu()
    src, dst = host[:, 0], host[:, 1]
    require(
        bool(((src >= 0) & (src < num_src)).all()),
        lambda: f"source block ids must be in [0, {num_src})",
    )
    require(
        bool(((dst >= 0) & (dst < num_dst)).all()),
        lambda: f"destination block ids must be in [0, {num_dst})",
    )
    require(dst.unique().numel() == dst.numel(), "a destination block appears twice in pairs")
    if same_pool:
        require(
            not bool(torch.isin(dst, src).any()),
            "a destination block is also a source; copies would race",
        )


def copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    pairs: torch.Tensor,
    *,
    programs: int | None = None,
    use_triton: bool | None = None,
    check_indices: bool = True,
) -> None:
    """Copy whole blocks pairs[i, 0] of ``src`` to blocks pairs[i, 1] of ``dst``: two
    contiguous block-major tensors on one device with the same block shape and dtype
    (a pool and a staging buffer). ``programs`` bounds the kernel's grid (see above)."""
    require(src.dim() >= 1 and dst.dim() >= 1, "src and dst must have a block dimension")
    require(src.is_contiguous() and dst.is_contiguous(), "src and dst must be contiguous")
    require(
        src.shape[1:] == dst.shape[1:] and src.dtype == dst.dtype,
        lambda: (
            f"blocks differ: {tuple(src.shape[1:])} {src.dtype} vs {tuple(dst.shape[1:])} {dst.dtype}"
        ),
    )
    require(src.device == dst.device, lambda: f"src on {src.device}, dst on {dst.device}")
    require(
        programs is None or (isinstance(programs, int) and programs >= 1),
        lambda: f"programs must be None or an int >= 1, got {programs!r}",
    )
    check_pairs(pairs, src.shape[0], dst.shape[0], check_indices, same_pool=src is dst)
    if pairs.shape[0] == 0:
        return
    pairs = pairs.to(src.device, non_blocking=True)
    if not use_triton_for(use_triton, src):
        dst[pairs[:, 1]] = src[pairs[:, 0]]
        return
    src_words, dst_words = as_words(src), as_words(dst)
    require(src_words.dtype == dst_words.dtype, "src and dst are aligned differently")
    launch_block_copy(src_words, dst_words, pairs, programs)


class RowCopy:
    """``copy_rows`` between two fixed tensors, checked once: for a loop that copies many
    pair lists between the same two tensors (a block transfer's chunks between a pool and a
    staging buffer), where checking and viewing the tensors again per call would cost more
    host time than the launch. ``pairs`` go unchecked: the caller made them in range."""

    def __init__(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        *,
        programs: int | None = None,
        use_triton: bool | None = None,
    ) -> None:
        empty = torch.empty((0, 2), dtype=torch.int64)
        copy_rows(src, dst, empty, programs=programs, use_triton=use_triton)  # the checks
        self._triton = use_triton_for(use_triton, src)
        self._programs = programs
        self._src, self._dst = src, dst
        if self._triton:
            self._src, self._dst = as_words(src), as_words(dst)
            require(self._src.dtype == self._dst.dtype, "src and dst are aligned differently")

    def __call__(self, pairs: torch.Tensor) -> None:
        """Copy block pairs[i, 0] of src to block pairs[i, 1] of dst (pairs [P, 2] int64 on
        their device, rows contiguous)."""
        if not self._triton:
            self._dst[pairs[:, 1]] = self._src[pairs[:, 0]]
        elif pairs.shape[0]:
            launch_block_copy(self._src, self._dst, pairs, self._programs)


def copy_blocks_ref(pool: torch.Tensor, pairs: torch.Tensor) -> None:
    src, dst = pairs[:, 0], pairs[:, 1]
    pool[dst] = pool[src]


def copy_blocks(
    pool: torch.Tensor,
    pairs: torch.Tensor,
    *,
    use_triton: bool | None = None,
    check_indices: bool = True,
) -> None:
    """Copy whole blocks (all layers, K and V) pairs[i, 0] -> pairs[i, 1] within ``pool``.

    ``pairs`` [P, 2] int64 may live on the host or the pool's device.
    """
    require(pool.dim() >= 1, "pool must have a block dimension")
    require(pool.is_contiguous(), "pool must be contiguous (block-major)")
    check_pairs(pairs, pool.shape[0], pool.shape[0], check_indices, same_pool=True)
    if pairs.shape[0] == 0:
        return
    pairs = pairs.to(pool.device, non_blocking=True)
    if not use_triton_for(use_triton, pool):
        copy_blocks_ref(pool, pairs)
        return
    words = as_words(pool)
    launch_block_copy(words, words, pairs)
