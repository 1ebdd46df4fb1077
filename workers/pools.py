"""Sizing and allocation of a worker's two block pools.

A pool is one tensor ``[num_blocks, *layout.block_shape]``. The GPU tier lives on the
worker's device (on a CPU-only worker that is the CPU too); the CPU tier is host memory,
pinned whenever the worker has a CUDA device so swaps can run asynchronously.
Both pools start zeroed: an export of a never-written block is deterministic.
"""

from __future__ import annotations

import os

import torch

from kvservice.core.errors import InvalidArgument
from kvservice.core.layout import Layout

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

GIB = 1 << 30
# Used when neither a count nor a fraction is given for a CUDA device.
DEFAULT_GPU_MEM_FRACTION = 0.9
# Block ids reach the kernels as int32 block tables.
MAX_BLOCKS = 2**31 - 1


def torch_dtype(layout: Layout) -> torch.dtype:
    return TORCH_DTYPES[layout.dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """The worker's device with an explicit index for CUDA (``"cuda"`` -> the current one)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InvalidArgument(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} asked for but CUDA is not available")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise InvalidArgument(
            f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


def _check_count(name: str, value: object, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgument(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > MAX_BLOCKS:
        raise InvalidArgument(f"{name} must be <= {MAX_BLOCKS}, got {value}")
    return value


def _check_positive(name: str, value: object, *, upper: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise InvalidArgument(f"{name} must be a positive number, got {value!r}")
    if upper is not None and value > upper:
        raise InvalidArgument(f"{name} must be <= {upper}, got {value!r}")
    return float(value)


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def num_gpu_tier_blocks(
    layout: Layout,
    device: torch.device,
    num_blocks: int | None,
    mem_fraction: float | None,
) -> int:
    """Blocks in the device-tier pool: an explicit count, or a fraction of device memory.

    The fraction is of the device's total memory, less what is already in use (as vLLM's
    gpu_memory_utilization), so model weights loaded first are respected. On a CPU worker a
    fraction is taken of the host's physical memory.
    """
    if num_blocks is not None and mem_fraction is not None:
        raise InvalidArgument("give num_gpu_blocks or gpu_mem_fraction, not both")
    if num_blocks is not None:
        return _check_count("num_gpu_blocks", num_blocks, minimum=1)
    if mem_fraction is None:
        if device.type != "cuda":
            raise InvalidArgument("a CPU worker needs num_gpu_blocks or gpu_mem_fraction")
        mem_fraction = DEFAULT_GPU_MEM_FRACTION
    fraction = _check_positive("gpu_mem_fraction", mem_fraction, upper=1.0)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(fraction * total) - (total - free)
    else:
        budget = int(fraction * _host_memory_bytes())
    count = min(budget // layout.block_bytes, MAX_BLOCKS)
    if count < 1:
        raise InvalidArgument(
            f"gpu_mem_fraction={fraction} leaves no room for one block of "
            f"{layout.block_bytes} bytes on {device}"
        )
    return count


def num_cpu_tier_blocks(layout: Layout, num_blocks: int | None, pool_gib: float | None) -> int:
    """Blocks in the host-tier pool: an explicit count, a size in GiB, or none at all."""
    if num_blocks is not None and pool_gib is not None:
        raise InvalidArgument("give num_cpu_blocks or cpu_pool_gib, not both")
    if num_blocks is not None:
        return _check_count("num_cpu_blocks", num_blocks, minimum=0)
    if pool_gib is None:
        return 0
    gib = _check_positive("cpu_pool_gib", pool_gib)
    return min(int(gib * GIB) // layout.block_bytes, MAX_BLOCKS)


def allocate_pool(
    layout: Layout, num_blocks: int, device: torch.device, *, pin_memory: bool = False
) -> torch.Tensor:
    return torch.zeros(
        (num_blocks, *layout.block_shape),
        dtype=torch_dtype(layout),
        device=device,
        pin_memory=pin_memory,
    )
