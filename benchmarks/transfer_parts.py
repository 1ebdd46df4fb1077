"""Where a block transfer's time goes: two worker objects in two processes (no Ray, one
GPU each), the same 1 GiB moved several ways, each side timed inside its process.

    python -m benchmarks.transfer_parts [--blocks 512] [--iters 10] [--ray] [--json]

Rows (median ms of ``iters``, the slower side; GB/s of the bytes moved):
- ``plain``: ``transfer_probe``, one contiguous buffer sent and received (the link), and
  the same buffer as several messages queued together (NCCL's cost per message);
- ``consecutive``: ``send_blocks``/``recv_blocks`` of consecutive blocks, which go from
  and into the pools directly (the chunk pipeline and its stream waits, no copies);
- ``scattered <copier>``: scattered blocks gathered into staging chunks and scattered
  back, per copier (the service's path);
- ``scattered, N chunks in flight``: the same with more staging buffers per side;
- ``ramped``: chunks of up to ``chunk_bytes`` that start (and end) at ``first_chunk_bytes``;
- ``ends full``: the first gather and the last scatter with a full grid (``FULL_GRID_ALONE``);
- ``gather only``: the sender's gathers of every chunk without sending (device time);
- ``peer copy push|pull``: the scattered blocks by one copy kernel over the peer's pool,
  mapped through CUDA IPC (only where the sides map each other: Ray actors, each seeing
  its own GPU as cuda:0).

With ``--ray`` the two sides run in two Ray actors of one GPU each (as the service's workers
do) instead of two plain processes: the same rows, to tell the process's surroundings
from the transfer path. Needs two GPUs; NVLS and multicast stay off (``TRANSFER_ENV``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvservice.core.ids import Tier
from kvservice.core.layout import Layout

LAYOUT = Layout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
POOL_BLOCKS = 2048
GROUP_KEY = "transfer-parts/"
MIB = 1 << 20
# The plain buffer as this many messages queued together.
PLAIN_PIECES = (8, 16)
# (copier, copy kernel programs or None for a full grid, chunks in flight per side,
#  chunk bytes, first chunk bytes or None for even chunks, first gather and last scatter
#  with a full grid: FULL_GRID_ALONE)
SCATTERED_RUNS: tuple[tuple[str, int | None, int, int, int | None, bool], ...] = (
    ("triton", 64, 3, 64 * MIB, None, False),
    ("triton", 64, 3, 128 * MIB, 64 * MIB, False),
    ("triton", 64, 3, 128 * MIB, 64 * MIB, True),
    ("triton", 64, 3, 128 * MIB, None, True),
    ("triton", 64, 3, 256 * MIB, None, True),
    ("triton", 64, 3, 256 * MIB, 64 * MIB, True),
    ("triton", 64, 3, 256 * MIB, 128 * MIB, True),
)
# The sender's gathers alone: (programs, words per program step, warps)
GATHER_RUNS: tuple[tuple[int | None, int, int], ...] = ((None, 2048, 4), (64, 2048, 4))


def _scattered(rank: int, blocks: int) -> np.ndarray:
    """Rank ``rank``'s scattered blocks: (tier, block id) rows, as the coordinator sends."""
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randperm(POOL_BLOCKS, generator=gen)[:blocks].numpy()
    return np.stack([np.full_like(ids, int(Tier.GPU)), ids], axis=1)


def _side(rank: int, port: int, blocks: int, iters: int, queue: Any) -> None:
    queue.put((rank, run_side(rank, port, blocks, iters, f"cuda:{rank}")))


def run_side(rank: int, port: int, blocks: int, iters: int, device: str) -> dict[str, Any]:
    """One side's rows: ``times`` (median seconds per row name) and ``phases`` (the host
    ms of the last block transfer's phases, ``transfer_info()["last_ms"]``, per row)."""
    import kvservice.workers.transfer as transfer
    from kvservice.kernels import copy_rows
    from kvservice.workers import Worker

    transfer.apply_transfer_env()
    worker = Worker(rank, LAYOUT, device=device, num_gpu_blocks=POOL_BLOCKS, num_cpu_blocks=1)
    peer = 1 - rank
    # (tier, block id) rows as the coordinator sends them: int64 arrays.
    scattered = _scattered(rank, blocks)
    consecutive = np.stack([np.full(blocks, int(Tier.GPU)), np.arange(blocks)], axis=1)
    num_bytes = blocks * LAYOUT.block_bytes
    results: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}

    joins = iter(range(1 << 30))

    def join(
        copier: str = "triton",
        programs: int | None = None,
        chunk: int = transfer.CHUNK_BYTES,
        first: int | None = None,
        peer_copy: str = "off",
    ) -> None:
        # A new store prefix per group: a prefix used before still holds its rendezvous.
        key = f"{GROUP_KEY}{next(joins)}/"
        worker.transfer_join(
            "127.0.0.1", port, key, rank, 2, "nccl", chunk_bytes=chunk, copier=copier,
            copy_programs=programs, first_chunk_bytes=first, peer_copy=peer_copy,
        )  # fmt: skip

    def timed(name: str, fn: Any) -> None:
        fn()  # warm-up
        times = []
        for _ in range(iters):
            dist.barrier()
            torch.cuda.synchronize(worker.device)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
        print(f"rank {rank}: {name} {1e3 * results[name]:.2f} ms", file=sys.stderr, flush=True)
        last = worker.transfer_info()["last_ms"].get("send" if rank == 0 else "recv")
        if last:
            phases[name] = {k: v for k, v in last.items() if k != "started_s"}
            worker._last_phases.clear()  # a row without a block transfer notes none

    def moves(which: np.ndarray, theirs: np.ndarray | None = None) -> Any:
        if rank == 0:
            return lambda: worker.send_blocks(peer, which, theirs)
        return lambda: worker.recv_blocks(peer, which, theirs)

    join()
    timed("plain", lambda: worker.transfer_probe(peer, num_bytes, rank == 0))
    for pieces in PLAIN_PIECES:
        timed(
            f"plain in {pieces} messages",
            lambda p=pieces: worker.transfer_probe(peer, num_bytes, rank == 0, 1, p),
        )
    timed("consecutive", moves(consecutive))
    default_in_flight = transfer.CHUNKS_IN_FLIGHT
    default_ends = transfer.FULL_GRID_ALONE
    for copier, programs, in_flight, chunk, first, full_ends in SCATTERED_RUNS:
        join(copier, programs, chunk, first)
        transfer.CHUNKS_IN_FLIGHT = in_flight
        transfer.FULL_GRID_ALONE = full_ends
        worker._reset_staging()
        grid = "full grid" if programs is None else f"{programs} programs"
        grid += " (ends full)" if full_ends else ""
        cut = f"{chunk // MIB} MiB" + ("" if first is None else f" from {first // MIB}")
        timed(f"scattered {copier}, {grid}, {cut}, {in_flight} in flight", moves(scattered))
    transfer.CHUNKS_IN_FLIGHT = default_in_flight
    transfer.FULL_GRID_ALONE = default_ends
    worker._reset_staging()
    for mode in ("push", "pull"):
        join(peer_copy=mode)
        if worker.transfer_info()["peers"]:  # both sides map alike (one host, one kind)
            timed(f"peer copy {mode}", moves(scattered, _scattered(peer, blocks)))

    per_chunk = transfer.CHUNK_BYTES // LAYOUT.block_bytes
    staging = torch.empty(
        (per_chunk, *LAYOUT.block_shape), dtype=worker.gpu_pool.dtype, device=worker.device
    )
    device_ids = torch.from_numpy(scattered[:, 1]).to(worker.device)

    def gather_only(programs: int | None) -> None:
        with torch.cuda.device(worker.device):  # Triton launches on the current device
            for start in range(0, blocks, per_chunk):
                part = device_ids[start : start + per_chunk]
                pairs = torch.stack([part, torch.arange(len(part), device=worker.device)], dim=1)
                copy_rows(worker.gpu_pool, staging[: len(part)], pairs, programs=programs,
                          check_indices=False)  # fmt: skip
            torch.cuda.synchronize(worker.device)

    import kvservice.kernels.copy as copy_kernel

    for programs, words, warps in GATHER_RUNS:
        copy_kernel._CHUNK, copy_kernel._NUM_WARPS = words, warps
        grid = "full grid" if programs is None else f"{programs} programs"
        timed(
            f"gather only, {grid}, {words} words x {warps} warps", lambda p=programs: gather_only(p)
        )
    worker.transfer_leave()
    return {"times": results, "phases": phases}


def _sides_in_ray(port: int, blocks: int, iters: int) -> dict[int, dict[str, Any]]:
    """Both sides in Ray actors of one GPU each (each sees its GPU as cuda:0)."""
    import ray
    from kvservice.workers.transfer import TRANSFER_ENV

    ray.init(runtime_env={"env_vars": dict(TRANSFER_ENV)}, log_to_driver=True)
    side = ray.remote(num_gpus=1)(_RaySide)
    actors = [side.remote() for _ in range(2)]  # type: ignore[attr-defined]
    results = ray.get([a.run.remote(r, port, blocks, iters) for r, a in enumerate(actors)])  # type: ignore[attr-defined]
    ray.shutdown()
    return dict(enumerate(results))


class _RaySide:
    def run(self, rank: int, port: int, blocks: int, iters: int) -> dict[str, Any]:
        return run_side(rank, port, blocks, iters, "cuda:0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--ray", action="store_true", help="sides in Ray actors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < 2:
        print("needs two GPUs", file=sys.stderr)
        return 2
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"})  # fmt: skip
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))  # fmt: skip
    if args.ray:
        sides = _sides_in_ray(store.port, args.blocks, args.iters)
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_side, args=(rank, store.port, args.blocks, args.iters, queue))
            for rank in range(2)
        ]
        for p in procs:
            p.start()
        sides = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    num_bytes = args.blocks * LAYOUT.block_bytes
    send, recv = sides[0]["times"], sides[1]["times"]
    rows: dict[str, dict[str, Any]] = {
        name: {
            "ms": 1e3 * max(send[name], recv[name]),
            "gbps": num_bytes / max(send[name], recv[name]) / 1e9,
        }
        for name in send
    }
    for name in rows:
        if name.startswith("gather only"):  # the sender's own
            rows[name] = {"ms": 1e3 * send[name], "gbps": num_bytes / send[name] / 1e9}
        for rank, side in ((0, "send"), (1, "recv")):
            if name in sides[rank]["phases"]:
                rows[name][f"{side}_host_ms"] = sides[rank]["phases"][name]
    from benchmarks.worker import versions

    report = {
        "benchmark": "transfer_parts",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "card": torch.cuda.get_device_name(0),
        "sides": "Ray actors" if args.ray else "processes",
        "bytes": num_bytes,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    print(f"{args.blocks} blocks ({num_bytes / 2**20:.0f} MiB) on {report['card']}, "
          f"sides in {report['sides']}")  # fmt: skip
    for name, row in rows.items():
        print(f"  {name:<56}{row['ms']:>8.2f} ms{row['gbps']:>9.1f} GB/s")
        for side in ("send", "recv"):
            host = row.get(f"{side}_host_ms")
            if host:  # where that side's host time went in the last transfer
                print(
                    f"      {side} host ms: " + ", ".join(f"{k} {v:.2f}" for k, v in host.items())
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
