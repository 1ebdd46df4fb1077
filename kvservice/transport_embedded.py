"""The embedded transport: coordinator and workers in the caller's process.

There is no transport object: the ``Coordinator`` is the service, and its workers are
local ``Worker`` objects behind ``LocalWorkerHandle`` (tensors are passed as they are,
never copied or serialized). This is what ``Client.embedded`` and ``kvservice demo`` use.
"""

from __future__ import annotations

from kvservice.coordinator import Coordinator
from kvservice.coordinator_workers import LocalWorkerHandle
from kvservice.core.errors import InvalidArgument
from kvservice.core.layout import Layout
from kvservice.layouts import DEFAULT_BLOCK_SIZE, parse_layout

# Device-tier size of a CPU worker when no size is given: small enough for any laptop.
DEFAULT_DEVICE_TIER_GIB = 0.25


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_embedded(
    layout: Layout | str = "tiny",
    *,
    num_workers: int = 1,
    device: str | None = None,
    num_gpu_blocks: int | None = None,
    gpu_mem_fraction: float | None = None,
    num_cpu_blocks: int | None = None,
    cpu_pool_gib: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    high_watermark: float = 0.95,
    low_watermark: float = 0.85,
    vocab_size: int | None = None,
    segment_tokens: int | None = None,
) -> Coordinator:
    """A coordinator over ``num_workers`` local workers, all on ``device``.

    Pool sizes are per worker (see ``kvservice.workers.Worker``); with none given, a CPU
    worker's device tier gets ``DEFAULT_DEVICE_TIER_GIB`` and a GPU worker
    ``gpu_mem_fraction`` 0.9 of its memory, shared out between workers on one GPU.
    ``segment_tokens``: see ``Coordinator`` (sequences longer than this are segmented).
    """
    from kvservice.workers import Worker

    layout = parse_layout(layout, block_size=block_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise InvalidArgument(f"num_workers must be an int >= 1, got {num_workers!r}")
    device = device or default_device()
    if num_gpu_blocks is None and gpu_mem_fraction is None:
        if device.startswith("cuda"):
            if num_workers == 1:
                gpu_mem_fraction = 0.9
            else:  # workers share one GPU: split what is free now
                import torch

                free, _total = torch.cuda.mem_get_info(torch.device(device))
                num_gpu_blocks = max(1, int(0.9 * free / num_workers) // layout.block_bytes)
        else:
            num_gpu_blocks = max(1, int(DEFAULT_DEVICE_TIER_GIB * (1 << 30)) // layout.block_bytes)
    workers = [
        Worker(
            worker_id,
            layout,
            device=device,
            num_gpu_blocks=num_gpu_blocks,
            gpu_mem_fraction=gpu_mem_fraction,
            num_cpu_blocks=num_cpu_blocks,
            cpu_pool_gib=cpu_pool_gib,
        )
        for worker_id in range(num_workers)
    ]
    return Coordinator(
        layout,
        [LocalWorkerHandle(w.worker_id, w) for w in workers],
        high_watermark=high_watermark,
        low_watermark=low_watermark,
        vocab_size=vocab_size,
        segment_tokens=segment_tokens,
    )
