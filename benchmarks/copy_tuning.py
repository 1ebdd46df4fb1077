"""Block copies between the pools of two GPUs of one host: the copy kernel's settings.

    python -m benchmarks.copy_tuning [--json] [--blocks 512] [--pool-blocks 2048]

The peer-copy path of a transfer (``kvservice.workers.transfer_peer``) is one launch of the
block-copy kernel (``kvservice.kernels.copy``) between a worker's pool and its peer's,
mapped over NVLink: pulled (the kernel on the receiver reads the sender's blocks) or pushed
(on the sender, writing the receiver's). Here both pools live in one process (peer access
on), and each setting of the kernel (words per program, warps, a fixed number of
programs) copies the same scattered blocks of the 8B-Llama shape (2 MiB each) both ways,
timed by CUDA events (median of ``--iters``); a contiguous ``copy_`` of the same bytes
between the devices (the copy engines) is the reference. Every copy is checked. Prints a
table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from typing import Any

import torch
from kvservice.kernels.copy import _CHUNK, _NUM_WARPS, _copy_blocks_kernel, as_words

BLOCK_BYTES = 2 << 20  # one block of 32 layers x 2 x 16 tokens x 8 heads x 128 x bf16
CHUNKS = (1024, 2048, 4096, 8192)
WARPS = (4, 8, 16)
PROGRAMS = (None, 132, 264, 528)


def timed(fn: Any, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs (after one warm-up), by CUDA events
    on the current device's stream."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def launch(
    src: torch.Tensor, dst: torch.Tensor, pairs: torch.Tensor, chunk: int, warps: int,
    programs: int | None,
) -> None:  # fmt: skip
    block_words = src.shape[1]
    chunks = -(-block_words // chunk)
    items = pairs.shape[0] * chunks
    grid = (items if programs is None else min(programs, items),)
    _copy_blocks_kernel[grid](
        src, dst, pairs, block_words, pairs.stride(0), items, chunks, CHUNK=chunk, num_warps=warps
    )


def run(blocks: int, pool_blocks: int, iters: int) -> dict[str, Any]:
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pools = [
        as_words(
            torch.empty(
                (pool_blocks, BLOCK_BYTES // 8), dtype=torch.int64, device=f"cuda:{d}"
            ).random_()
        )
        for d in (0, 1)
    ]
    # Peer access, as CUDA IPC gives two workers: a cross-device copy turns it on.
    pools[1][:1].copy_(pools[0][:1])
    pools[0][:1].copy_(pools[1][:1])
    perm = torch.randperm(pool_blocks, generator=gen)
    pairs_host = torch.stack(
        [perm[:blocks], torch.randperm(pool_blocks, generator=gen)[:blocks]], 1
    )
    nbytes = blocks * BLOCK_BYTES
    ref_src = torch.empty(nbytes // 8, dtype=torch.int64, device="cuda:1")
    ref_dst = torch.empty(nbytes // 8, dtype=torch.int64, device="cuda:0")
    with torch.cuda.device(0):
        reference = timed(lambda: ref_dst.copy_(ref_src), iters)
    rows = []
    for direction, device, src, dst in (
        ("pull", 0, pools[1], pools[0]),
        ("push", 1, pools[1], pools[0]),
    ):
        pairs = pairs_host.to(f"cuda:{device}")
        want = src[pairs_host[:, 0].to("cuda:1")].to("cuda:0")
        for chunk in CHUNKS:
            for warps in WARPS:
                for programs in PROGRAMS:
                    args = (src, dst, pairs, chunk, warps, programs)
                    with torch.cuda.device(device):
                        seconds = timed(lambda args=args: launch(*args), iters)
                    ok = bool(torch.equal(dst[pairs_host[:, 1].to("cuda:0")], want))
                    dst[pairs_host[:, 1].to("cuda:0")] = 0  # the next setting must copy again
                    rows.append({
                        "direction": direction, "chunk": chunk, "warps": warps,
                        "programs": programs, "gbps": nbytes / seconds / 1e9, "ok": ok,
                        "current": chunk == _CHUNK and warps == _NUM_WARPS and programs is None,
                    })  # fmt: skip
    return {
        "benchmark": "copy_tuning",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__},
        "blocks": blocks,
        "bytes": nbytes,
        "copy_engine_gbps": nbytes / reference / 1e9,
        "rows": rows,
        "ok": all(r["ok"] for r in rows),
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['card']}: {report['blocks']} blocks of 2 MiB between two GPUs; contiguous "
        f"copy_ (copy engines) {report['copy_engine_gbps']:.1f} GB/s; checks "
        f"{'ok' if report['ok'] else 'FAILED'}",
        f"{'direction':>10}{'chunk':>7}{'warps':>7}{'programs':>10}{'GB/s':>9}",
    ]
    for direction in ("pull", "push"):
        rows = sorted(
            (r for r in report["rows"] if r["direction"] == direction), key=lambda r: -r["gbps"]
        )
        for r in rows[:6] + [r for r in rows[6:] if r["current"]]:
            lines.append(
                f"{direction:>10}{r['chunk']:>7}{r['warps']:>7}{str(r['programs']):>10}"
                f"{r['gbps']:>9.1f}{'  (current)' if r['current'] else ''}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--pool-blocks", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    report = run(args.blocks, args.pool_blocks, args.iters)
    print(json.dumps(report, indent=2) if args.json else table(report))
    if args.json:
        print(table(report), file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
