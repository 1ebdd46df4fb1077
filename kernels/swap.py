"""Swap of scattered blocks between a GPU pool and a pinned host pool (either direction).

All pairs move in one launch of the block-copy kernel (copy.py) running on a dedicated
stream: the kernel reads or writes the pinned host pool directly through unified virtual
addressing, so scattered host blocks need neither one copy call per block nor a host-side
scatter. The swap stream first waits for the caller's current stream (so pending writes
to the source are seen) and records an event the caller waits on before touching the
destination blocks or reusing the source blocks. Two host pools are copied synchronously.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from ._common import require, use_triton_for
from .copy import as_words, check_pairs, launch_block_copy

logger = logging.getLogger(__name__)


@dataclass
class SwapHandle:
    """An in-flight (or finished) swap. ``event`` is None when it ran synchronously."""

    event: torch.cuda.Event | None = None
    # Tensors the swap stream still reads; kept alive until the copy is done.
    _keep_alive: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self._keep_alive = ()

    def done(self) -> bool:
        finished = self.event is None or self.event.query()
        if finished:
            self._keep_alive = ()
        return finished


@functools.cache
def _swap_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def swap_blocks_ref(src_pool: torch.Tensor, dst_pool: torch.Tensor, pairs: torch.Tensor) -> None:
    src, dst = pairs[:, 0].to(src_pool.device), pairs[:, 1].to(dst_pool.device)
    dst_pool[dst] = src_pool[src].to(dst_pool.device)


def _check_swap(
    src_pool: torch.Tensor, dst_pool: torch.Tensor, pairs: torch.Tensor, check_indices: bool
) -> None:
    require(src_pool.dim() >= 1 and dst_pool.dim() >= 1, "pools must have a block dimension")
    require(
        tuple(src_pool.shape[1:]) == tuple(dst_pool.shape[1:]),
        lambda: f"block shapes differ: {tuple(src_pool.shape[1:])} vs {tuple(dst_pool.shape[1:])}",
    )
    require(src_pool.dtype == dst_pool.dtype, lambda: f"pool dtypes differ: {src_pool.dtype}, {dst_pool.dtype}")
    require(src_pool.is_contiguous() and dst_pool.is_contiguous(), "pools must be contiguous")
    require(
        not (src_pool.is_cuda and dst_pool.is_cuda),
        "swap moves blocks between a GPU pool and a host pool; use copy_blocks within a GPU pool",
    )
    for name, pool, other in (("src_pool", src_pool, dst_pool), ("dst_pool", dst_pool, src_pool)):
        if other.is_cuda:
            require(pool.is_pinned(), lambda name=name: f"{name} must be pinned host memory to swap with a GPU pool")
    require(
        src_pool.data_ptr() != dst_pool.data_ptr() or src_pool.numel() == 0,
        "src_pool and dst_pool are the same tensor; use copy_blocks",
    )
    check_pairs(pairs, src_pool.shape[0], dst_pool.shape[0], check_indices, same_pool=False)


def swap_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    pairs: torch.Tensor,
    *,
    stream: torch.cuda.Stream | None = None,
    use_triton: bool | None = None,
    check_indices: bool = True,
) -> SwapHandle:
    """Copy block pairs[i, 0] of src_pool into block pairs[i, 1] of dst_pool.

    One pool on a GPU and the other pinned on the host (either direction), or both on the
    host. On a GPU the copy is asynchronous on ``stream`` (default: a per-device swap
    stream); the returned handle's ``wait()`` blocks until it is done.
    """
    _check_swap(src_pool, dst_pool, pairs, check_indices)
    gpu_pool = src_pool if src_pool.is_cuda else dst_pool if dst_pool.is_cuda else None
    if pairs.shape[0] == 0:
        return SwapHandle()
    if gpu_pool is None:
        if use_triton_for(use_triton, src_pool):
            launch_block_copy(as_words(src_pool), as_words(dst_pool), pairs.contiguous())
        else:
            swap_blocks_ref(src_pool, dst_pool, pairs)
        return SwapHandle()

    device = gpu_pool.device
    stream = stream or _swap_stream(device.index if device.index is not None else 0)
    device_pairs = pairs.to(device, non_blocking=True).contiguous()
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        if _kernel_reaches_host(device):
            launch_block_copy(as_words(src_pool), as_words(dst_pool), device_pairs)
        else:
            _staged_swap(src_pool, dst_pool, pairs, device_pairs)
        event = torch.cuda.Event()
        event.record(stream)
    device_pairs.record_stream(stream)
    return SwapHandle(event=event, _keep_alive=(device_pairs, src_pool, dst_pool))


@functools.cache
def _kernel_reaches_host(device: torch.device) -> bool:
    """Whether a Triton kernel on ``device`` may take a pinned host pointer (UVA)."""
    host = torch.arange(8, dtype=torch.int64).pin_memory()
    dev = torch.zeros(8, dtype=torch.int64, device=device)
    pairs = torch.zeros(1, 2, dtype=torch.int64, device=device)
    try:
        launch_block_copy(host.view(1, 8), dev.view(1, 8), pairs)
        torch.cuda.synchronize(device)
    except Exception as exc:  # the driver or Triton refused the host pointer
        logger.warning("swap falls back to staged copies: %s", exc)
        return False
    return bool(torch.equal(dev.cpu(), host))


def _staged_swap(
    src_pool: torch.Tensor, dst_pool: torch.Tensor, pairs: torch.Tensor, device_pairs: torch.Tensor
) -> None:
    """Fallback: gather on the source side into one buffer, one copy, scatter (synchronous)."""
    src_ids = (device_pairs if src_pool.is_cuda else pairs)[:, 0]
    dst_ids = (device_pairs if dst_pool.is_cuda else pairs)[:, 1]
    staged = src_pool[src_ids]
    if src_pool.is_cuda:
        host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
        host.copy_(staged, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        dst_pool[dst_ids] = host
    else:
        dst_pool[dst_ids] = staged.pin_memory().to(dst_pool.device, non_blocking=True)
