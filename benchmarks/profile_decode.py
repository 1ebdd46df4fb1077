"""Host cost of one decode attention call through the service, on CPU workers.

    python -m benchmarks.profile_decode [--workers 1,2] [--calls 200] [--profile FILE]

The scaling benchmark's GPU shapes (``benchmarks.scaling.GPU_SETUP``: 64 sequences of
16,384 tokens per call, 1,024 blocks each, one layer of Llama-3-8B's KV shape) run
through a coordinator in this process over Ray CPU worker actors whose kernels are made
trivial (``worker_setup``: ``paged_decode`` returns zeros, ``write_kv`` does nothing and
pools are left unwritten), so what is timed is the host work a GPU run pays per call:
the coordinator, Ray, the wire form and the worker's checks.

Reported per worker count: wall time per call with one client thread (the serial cost,
driver plus worker), the worker's own time per call (``wire_call``: decoding, the call
itself and encoding; ``attend``: the call itself), the calls/s with one client thread per
group (one group of ``batch`` sequences per worker, ``depth`` threads per group, so as
many of its calls in flight), the driver thread's CPU time per call (what the GIL sees),
and with ``--profile`` the driver's cProfile of the single-thread loop.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import threading
import time
from typing import Any

import torch

from benchmarks.worker import ROOT, install_checkout_finder

install_checkout_finder()

NAMESPACE = "kvservice-profile-decode"


def worker_setup() -> None:
    """Ray's worker-process hook here: the checkout importable and the kernels trivial."""
    install_checkout_finder()
    import kvservice.kernels as kernels
    import kvservice.workers.actor as actor
    import kvservice.workers.worker as worker

    outputs: dict[tuple[Any, ...], torch.Tensor] = {}

    def paged_decode(q: torch.Tensor, *args: Any, return_lse: bool = False, **kwargs: Any) -> Any:
        # One output per shape, made once: a fresh one would time this machine's page faults.
        key = (*q.shape, q.dtype)
        out = outputs.get(key)
        if out is None:
            out = outputs[key] = torch.zeros_like(q)
        if return_lse:
            return out, torch.zeros(q.shape[:2], dtype=torch.float32)
        return out

    def write_kv(*args: Any, **kwargs: Any) -> None:
        return None

    def allocate_pool(
        layout: Any, num_blocks: int, device: Any, *, pin_memory: bool = False
    ) -> torch.Tensor:
        # Never written (the kernels above touch nothing): pages are not even mapped.
        from kvservice.workers.pools import torch_dtype

        return torch.empty(
            (num_blocks, *layout.block_shape), dtype=torch_dtype(layout), device=device
        )

    kernels.paged_decode = paged_decode
    kernels.write_kv = write_kv
    worker.allocate_pool = allocate_pool

    timed = actor.RayWorker.wire_call

    def wire_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return timed(self, *args, **kwargs)
        finally:
            self._call_calls["wire_call"] += 1
            self._call_seconds["wire_call"] += time.perf_counter() - start

    actor.RayWorker.wire_call = wire_call


def start_ray(inline_bytes: int | None) -> None:
    import os

    import ray
    from kvservice.workers.transfer import TRANSFER_ENV

    if ray.is_initialized():
        return
    if inline_bytes:
        os.environ["RAY_max_direct_call_object_size"] = str(inline_bytes)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    ray.init(
        num_gpus=0,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "benchmarks.profile_decode.worker_setup",
            "env_vars": dict(TRANSFER_ENV),
        },
    )


def call_times(coord: Any) -> dict[int, dict[str, tuple[int, float]]]:
    out = {}
    for wid, handle in coord._handles.items():
        stats = handle.call("stats")["call_time"]
        out[wid] = {k: (v["calls"], v["seconds"]) for k, v in stats.items()}
    return out


def per_call_ms(before: dict[str, Any], after: dict[str, Any], name: str) -> float | None:
    c0, s0 = before.get(name, (0, 0.0))
    c1, s1 = after.get(name, (0, 0.0))
    return 1e3 * (s1 - s0) / (c1 - c0) if c1 > c0 else None


class TicketLoop:
    """A client process: ``calls`` attention calls through a ticket, one at a time."""

    def loop(self, ticket: Any, q: torch.Tensor, calls: int) -> float:
        for _ in range(3):
            ticket.attend(0, q)
        t0 = time.perf_counter()
        for _ in range(calls):
            ticket.attend(0, q)
        return 1e3 * (time.perf_counter() - t0) / calls


def run(num_workers: int, calls: int, depth: int, profile: str | None) -> dict[str, Any]:
    from benchmarks.scaling import GPU_SETUP, fill, start

    setup = GPU_SETUP
    per_worker = setup.batch
    num_seqs = per_worker * num_workers
    blocks_per_seq = setup.layout.num_blocks_for(setup.context)
    num_blocks = per_worker * blocks_per_seq + 64
    t0 = time.perf_counter()
    coord = start(setup.layout, num_workers, num_blocks, False, f"p{num_workers}")
    report: dict[str, Any] = {"workers": num_workers, "start_s": time.perf_counter() - t0}
    try:
        t0 = time.perf_counter()
        seqs = fill(coord, setup, num_seqs=num_seqs)
        report["fill_s"] = time.perf_counter() - t0
        by_worker: dict[int, list[int]] = {}
        for sid, (wid, _) in sorted(seqs.items()):
            by_worker.setdefault(wid, []).append(sid)
        report["placement"] = {str(w): len(ids) for w, ids in by_worker.items()}
        groups = [
            ids[i : i + setup.batch]
            for ids in by_worker.values()
            for i in range(0, len(ids), setup.batch)
        ]
        dtype = getattr(torch, setup.layout.dtype)
        qs = [
            torch.randn((len(g), setup.num_q_heads, setup.layout.head_dim)).to(dtype)
            for g in groups
        ]

        # One thread, one group after another: the serial cost of a call.
        ids, q = groups[0], qs[0]
        ones = [1] * len(ids)
        for _ in range(3):
            coord.attend(0, ids, ones, q)
        before = call_times(coord)
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        if prof:
            prof.enable()
        for _ in range(calls):
            coord.attend(0, ids, ones, q)
        if prof:
            prof.disable()
        serial_s = time.perf_counter() - t0
        report["driver_cpu_ms"] = 1e3 * (time.thread_time() - cpu0) / calls
        after = call_times(coord)
        wid = seqs[ids[0]][0]
        report["serial_call_ms"] = 1e3 * serial_s / calls
        report["worker_wire_call_ms"] = per_call_ms(before[wid], after[wid], "wire_call")
        report["worker_attend_ms"] = per_call_ms(before[wid], after[wid], "attend")
        if prof:
            with open(profile, "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(40)
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)

        # The same calls from another process through a step ticket (the coordinator off
        # the per-call path): the serial cost and the worker's own time per call.
        import ray

        ticket = coord.open_ticket(ids, ones, writes=False)
        client_actor = ray.remote(num_cpus=0)(TicketLoop).remote()
        before = call_times(coord)
        report["ticket_serial_call_ms"] = ray.get(client_actor.loop.remote(ticket, q, calls))
        after = call_times(coord)
        report["ticket_worker_attend_ms"] = per_call_ms(before[wid], after[wid], "attend")
        report["ticket_worker_wire_call_ms"] = per_call_ms(before[wid], after[wid], "wire_call")
        coord.close_ticket(ticket.ticket_id)

        # One thread per group, all at once: are calls to different workers overlapped?
        def client(ids: list[int], q: torch.Tensor) -> None:
            ones = [1] * len(ids)
            for _ in range(calls):
                coord.attend(0, ids, ones, q)

        for g, q in zip(groups, qs, strict=True):
            coord.attend(0, g, [1] * len(g), q)
        threads = [
            threading.Thread(target=client, args=gq)
            for gq in zip(groups, qs, strict=True)
            for _ in range(depth)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parallel_s = time.perf_counter() - t0
        report["parallel_calls_s"] = calls * len(threads) / parallel_s
        report["serial_calls_s"] = calls / serial_s
        coord.free(list(seqs))
    finally:
        coord.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--profile", default=None, help="write the driver's cProfile here")
    parser.add_argument(
        "--inline-bytes", type=int, default=None,
        help="Ray's max_direct_call_object_size (arguments and results up to it skip the object store)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    start_ray(args.inline_bytes)
    reports = [
        run(int(w), args.calls, args.depth, args.profile if i == 0 else None)
        for i, w in enumerate(args.workers.split(","))
    ]
    print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
