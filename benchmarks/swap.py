"""Swap of scattered blocks between a GPU pool and a pinned host pool, against a plain copy.

    python -m benchmarks.swap [--json] [--out FILE] [--pages N]

The 8B-Llama block shape (32 layers, 8 KV heads, d=128, bf16, page 16: 2 MiB a block);
2,048 scattered pages each direction. Baselines of the same run: one plain pinned copy of
the same number of bytes (contiguous, a single call) and, for scale, one copy call per
block. Each swap is timed from the call to ``wait()`` returning, so the launch is inside
the time; medians of several runs. Prints a table; ``--json`` also prints the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import triton
from kvservice.kernels import swap_blocks

LAYERS, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
REPEATS = 7


def wall_ms(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median wall time of ``fn`` (which must finish its own work) after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the JSON result")
    parser.add_argument("--out", help="write the JSON result to this file")
    parser.add_argument("--pages", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.swap needs a CUDA GPU")
    torch.manual_seed(0)
    pages = args.pages
    pool_blocks = pages + pages // 4
    block_shape = (LAYERS, 2, BS, HKV, D)
    gpu = torch.empty((pool_blocks, *block_shape), dtype=DTYPE, device="cuda").normal_()
    host = torch.empty((pool_blocks, *block_shape), dtype=DTYPE, pin_memory=True)
    host.copy_(gpu.flip(0))  # random, and different from the GPU pool's same-numbered blocks
    block_bytes = gpu[0].numel() * gpu.element_size()
    total = pages * block_bytes

    def scattered() -> torch.Tensor:
        return torch.stack(
            [torch.randperm(pool_blocks)[:pages], torch.randperm(pool_blocks)[:pages]], dim=1
        )

    out_pairs, in_pairs = scattered(), scattered()
    result: dict[str, Any] = {
        "benchmark": "swap",
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pages": pages,
        "block_mib": block_bytes / 2**20,
        "total_gib": total / 2**30,
    }

    # Correctness on the very pools that are timed.
    swap_blocks(gpu, host, out_pairs).wait()
    ok_out = torch.equal(host[out_pairs[:100, 1]], gpu[out_pairs[:100, 0].cuda()].cpu())
    swap_blocks(host, gpu, in_pairs).wait()
    ok_in = torch.equal(gpu[in_pairs[:100, 1].cuda()].cpu(), host[in_pairs[:100, 0]])
    result["correct"] = ok_out and ok_in

    gpu_flat = gpu.view(-1)[: total // gpu.element_size()]
    host_flat = host.view(-1)[: total // host.element_size()]

    def plain_d2h() -> None:
        host_flat.copy_(gpu_flat, non_blocking=True)
        torch.cuda.synchronize()

    def plain_h2d() -> None:
        gpu_flat.copy_(host_flat, non_blocking=True)
        torch.cuda.synchronize()

    def per_block(src: torch.Tensor, dst: torch.Tensor, pairs: torch.Tensor) -> Callable[[], None]:
        pair_list = pairs.tolist()

        def run() -> None:
            for s, d in pair_list:
                dst[d].copy_(src[s], non_blocking=True)
            torch.cuda.synchronize()

        return run

    rows = []
    for name, src, dst, pairs, plain in (
        ("gpu->host", gpu, host, out_pairs, plain_d2h),
        ("host->gpu", host, gpu, in_pairs, plain_h2d),
    ):
        swap_ms = wall_ms(lambda src=src, dst=dst, pairs=pairs: swap_blocks(
            src, dst, pairs, check_indices=False).wait())
        swap_checked_ms = wall_ms(lambda src=src, dst=dst, pairs=pairs: swap_blocks(
            src, dst, pairs).wait())
        plain_ms = wall_ms(plain)
        per_block_ms = wall_ms(per_block(src, dst, pairs), repeats=3)
        rows.append({
            "direction": name,
            "swap_ms": swap_ms,
            "swap_checked_ms": swap_checked_ms,
            "plain_copy_ms": plain_ms,
            "per_block_copy_ms": per_block_ms,
            "swap_gbps": total / swap_ms / 1e6,
            "plain_copy_gbps": total / plain_ms / 1e6,
            "per_block_copy_gbps": total / per_block_ms / 1e6,
            "swap_vs_plain_pct": 100 * plain_ms / swap_ms,
        })
    result["rows"] = rows
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    print(f"swap {pages} x {block_bytes / 2**20:.0f} MiB pages on {result['card']}, correct={result['correct']}")
    print("| direction | swap GB/s | plain pinned copy GB/s | swap / plain | one copy per block GB/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['direction']} | {r['swap_gbps']:.1f} | {r['plain_copy_gbps']:.1f} | "
            f"{r['swap_vs_plain_pct']:.0f}% | {r['per_block_copy_gbps']:.1f} |"
        )


if __name__ == "__main__":
    main()
