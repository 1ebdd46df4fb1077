"""Scaling over workers: decode throughput and capacity with 1, 2 and 4 workers, and block
transfers between two workers against a plain NCCL send/recv of the same bytes.

    python -m benchmarks.scaling [--json] [--small] [--workers 1,2,4] [--out FILE]
        [--phases decode,capacity,transfer] [--skip-capacity] [--depth N] [--steps N]
        [--clients-per-group N] [--decode-graphs N] [--variants ray,channel+graphs,...]
        [--ticket-only]
    python -m benchmarks.scaling --table-from FILE   (the table of a JSON written before)

Starts Ray (``ray.init(num_gpus=<visible GPUs>)`` unless already connected) and, for each
worker count (default 1, 2 and 4, as far as there are GPUs; 1 and 2 CPU workers without
a GPU, where ``--small`` is implied), a service as ``kvservice serve`` runs it: a
coordinator in this process over one worker actor per GPU in a placement group, with the
transfer group formed. NVLS and multicast stay off everywhere (``TRANSFER_ENV``).

- **Decode throughput** over one fixed workload: ``num_seqs`` sequences of ``context``
  tokens, placed by the service, their K/V written through it; then ``steps`` decode
  steps, each one attention call per group of up to ``batch`` sequences of one worker.
  Two ways, both reported:
  ``decode`` (the figure the targets use): as a serving deployment runs, each group is
  served by ``clients_per_group`` client processes (Ray actors, the same number at every
  worker count; the group's steps split between them) that take the group's step ticket
  from the coordinator (``kvservice.tickets``: planned once, read-only, so it serves
  every step) and send its attention calls straight to its worker, ``depth`` calls in
  flight each, so the coordinator is off the per-call path (over the worker's local
  channel, as clients on the workers' host do; on the worker, ticket calls queue their
  kernels while earlier calls' outputs go back). ``--variants`` times other ways of
  running it (through Ray, with decode graphs) one window each in turn with the main one
  on the same service, reported under ``decode_variants``; ``decode_via_coordinator``: every call through
  ``Coordinator.attend`` from ``depth`` threads per group of this one process, which
  bounds the calls per second whatever the number of workers. Reported: tokens/s (one
  token per sequence per step), the K/V bytes read per second, the speedup over one
  worker, wall ms per call per worker, the workers' busy share of the wall time (below
  100 %: they waited for calls), and the kernel's share of the workers' attention-call
  time (the rest is per-call work in the worker; a ticket call's time is its queuing
  only, so there the kernel share passes 100 %). Ray's max_direct_call_object_size is raised
  (``INLINE_BYTES``) so q and the output travel inline with the call, not through the
  object store. Each sequence holds one K/V row repeated, so its attention output is
  known exactly (its V row): checked.
- **Maximum concurrent sequences**: with the workload's sequences in place, sequences of
  ``max_context`` tokens created until the service answers RESOURCE_EXHAUSTED (no CPU
  tier); the count includes the workload's own. Tokens go as a tensor (the service
  checks a list one element at a time).
- **Block transfer** (two workers): ``transfer_blocks`` scattered blocks of the 8B-Llama
  shape (2 MiB each) sent GPU to GPU by the service's transfer path (gather, send, recv,
  scatter), against ``transfer_probe``: a plain send/recv of one buffer of the same bytes
  between the same two processes, both timed alike (the two actor calls, from here;
  median of ``iters``). Also the same transfer through host memory (the fallback) and a
  whole migration of sequences through the coordinator. The moved blocks are checked.

Progress lines with the elapsed seconds go to stderr as each phase starts and ends; the
JSON so far is written to ``--out`` after each part (a run cut short keeps what it
measured), and SIGTERM dumps every thread's stack first. Prints the table last. Exit
status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.worker import init_ray_for_checkout, install_checkout_finder, versions

install_checkout_finder()

from kvservice.workers.transfer import TRANSFER_ENV  # noqa: E402

os.environ.update(TRANSFER_ENV)  # this process too, before anything starts NCCL

from kvservice.coordinator import Coordinator  # noqa: E402
from kvservice.coordinator_workers import resolve_all  # noqa: E402
from kvservice.core.errors import ResourceExhausted  # noqa: E402
from kvservice.core.ids import BlockId, Tier, WorkerId  # noqa: E402
from kvservice.core.layout import Layout  # noqa: E402
from kvservice.core.migration import TransferBlocks  # noqa: E402
from kvservice.transfers import submit_transfer  # noqa: E402
from kvservice.transport_ray import start_ray_service  # noqa: E402

NAMESPACE = "kvservice-bench-scaling"
INLINE_BYTES = 2 << 20
BARRIER_TIMEOUT_S = 300.0
# Client processes start their timed calls together, this long after they are asked to.
CLIENT_START_DELAY_S = 1.0
# Untimed calls per client before each window (graphs captured, connections made).
WARM_CALLS = 4


@dataclass(frozen=True, slots=True)
class Setup:
    layout: Layout  # of the decode workload
    num_q_heads: int
    num_seqs: int
    context: int
    batch: int  # sequences per attention call
    steps: int
    warmup_steps: int
    num_gpu_blocks: int  # per worker
    max_context: int  # sequence length of the capacity count
    transfer_layout: Layout
    transfer_blocks: int
    transfer_pool_blocks: int
    iters: int
    depth: int  # calls each client (thread or process) of a call group keeps in flight
    # Client processes per call group (ticket path): the steps are split between them, so
    # one process's own per-call cost does not bound what its worker is fed.
    clients_per_group: int = 1
    other_clients_per_group: tuple[int, ...] = ()  # also timed, reported beside
    # Timed windows of ``steps`` per ticket-path decode; the median one is reported: one
    # window's rate moves by ~10 % from run to run, and the ratios inherit it.
    windows: int = 1
    # Other ways to run the ticket path (``Variant.parse``), timed window by window in
    # turn with the main one on the same service, so drift of the host hits all alike.
    variants: tuple[str, ...] = ()
    # Also time the paths off the ticket path (every call through the coordinator, and
    # tickets from threads of the driver).
    other_paths: bool = True


@dataclass(frozen=True, slots=True)
class Variant:
    """One way to run the ticket path: over the workers' local channels or Ray, with how
    many decode graphs per worker."""

    name: str
    channel: bool
    graphs: int

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``ray`` or ``channel``, optionally ``+graphs`` (``AB_GRAPHS`` graphs per worker)."""
        path, _, extra = spec.partition("+")
        if path not in ("ray", "channel") or extra not in ("", "graphs"):
            raise ValueError(f"a variant is ray|channel[+graphs], got {spec!r}")
        return cls(spec, path == "channel", AB_GRAPHS if extra else 0)


AB_GRAPHS = 16  # decode graphs per worker in a variant with graphs


# The decode workload holds one layer of Llama-3-8B's KV shape (8 KV heads of 128, bf16;
# 4 KiB per token): a call reads its sequences' whole context, as one layer of a decode
# step does. 256 x 16,384 tokens = 16 GiB, which one 80 GB card holds.
GPU_SETUP = Setup(
    layout=Layout(num_layers=1, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16),
    num_q_heads=32,
    num_seqs=256,
    context=16384,
    batch=64,
    steps=400,
    warmup_steps=3,
    num_gpu_blocks=300_000,  # 18.3 GiB per worker
    max_context=16384,
    transfer_layout=Layout(
        num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16
    ),
    transfer_blocks=512,  # 1 GiB
    transfer_pool_blocks=2048,
    iters=10,
    depth=4,  # a worker with one client still has calls queued
    clients_per_group=2,
    other_clients_per_group=(1,),
    windows=3,
)
SMALL_SETUP = Setup(
    layout=Layout(num_layers=1, num_kv_heads=2, head_dim=64, dtype="float32", block_size=16),
    num_q_heads=8,
    num_seqs=16,
    context=512,
    batch=4,
    steps=20,
    warmup_steps=1,
    num_gpu_blocks=640,
    max_context=512,
    transfer_layout=Layout(
        num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32", block_size=16
    ),
    transfer_blocks=64,
    transfer_pool_blocks=128,
    iters=5,
    depth=2,
    other_clients_per_group=(2,),
    windows=2,
)


def start(
    layout: Layout, num_workers: int, num_gpu_blocks: int, use_gpu: bool, tag: str
) -> Coordinator:
    return start_ray_service(
        layout,
        num_workers=num_workers,
        use_gpu=use_gpu,
        namespace=f"{NAMESPACE}-{tag}",
        recover=False,
        detached_workers=False,
        transfer_group=True,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=0,
        **({} if DECODE_GRAPHS is None else {"decode_graphs": DECODE_GRAPHS}),
    )


_START = time.perf_counter()


def progress(message: str, *args: Any) -> None:
    """One progress line on stderr with the seconds since the benchmark started."""
    text = message % args if args else message
    print(f"[scaling {time.perf_counter() - _START:7.1f}s] {text}", file=sys.stderr, flush=True)


def tokens_at(start: int, count: int) -> torch.Tensor:
    # A tensor crosses the coordinator's token check in one tolist(), a range one int at a time.
    return torch.arange(start, start + count, dtype=torch.int64)


def max_sequences(coord: Coordinator, setup: Setup, already: int) -> int:
    """Sequences of ``max_context`` distinct tokens the service holds: ``already`` (the
    workload's, of ``context`` tokens) plus those created until it refuses."""
    assert setup.context == setup.max_context, "the workload's sequences count as capacity"
    made: list[int] = []
    started = time.perf_counter()
    try:
        while True:
            made.append(
                coord.create_sequence(
                    tokens_at(len(made) * setup.max_context, setup.max_context)
                ).seq_id
            )
            if len(made) % 100 == 0:
                progress(
                    "  capacity: %d created, %.1f ms each",
                    len(made),
                    1e3 * (time.perf_counter() - started) / len(made),
                )
    except ResourceExhausted:
        pass
    for i in range(0, len(made), 256):
        coord.free(made[i : i + 256])
    return already + len(made)


def fill(
    coord: Coordinator, setup: Setup, num_seqs: int | None = None
) -> dict[int, tuple[int, torch.Tensor]]:
    """The workload's sequences, each one random K/V row repeated over its context
    (expanded tensors: a few bytes cross Ray, the worker materializes them); returns
    sequence -> (worker, its V row)."""
    layout = setup.layout
    dtype = getattr(torch, layout.dtype)
    gen = torch.Generator().manual_seed(0)
    out: dict[int, tuple[int, torch.Tensor]] = {}
    for i in range(setup.num_seqs if num_seqs is None else num_seqs):
        info = coord.create_sequence(tokens_at(10**9 + i * setup.context, setup.context))
        k_row, v_row = (
            torch.randn((1, layout.num_kv_heads, layout.head_dim), generator=gen).to(dtype)
            for _ in range(2)
        )
        shape = (setup.context, layout.num_kv_heads, layout.head_dim)
        coord.write_kv(0, [info.seq_id], [setup.context], k_row.expand(shape), v_row.expand(shape))
        out[info.seq_id] = (info.worker_id, v_row[0])
    return out


def decode(
    coord: Coordinator,
    setup: Setup,
    seqs: dict[int, tuple[int, torch.Tensor]],
    *,
    tickets: bool = False,
) -> dict[str, Any]:
    """``steps`` decode steps over every sequence: ``depth`` client threads per call
    group, so that many of each group's calls are in flight (a worker has the next call
    queued while the driver takes the last one's result). Every call goes through the
    coordinator, or with ``tickets`` straight to the worker through a step ticket."""
    groups = _groups(setup, seqs)
    opened = (
        {g[0]: coord.open_ticket(g, [1] * len(g), writes=False, ttl_s=3600) for g in groups}
        if tickets
        else {}
    )
    num_workers = len({w for w, _ in seqs.values()})
    errors: list[float] = []
    failures: list[BaseException] = []
    num_threads = len(groups) * setup.depth
    barrier = threading.Barrier(num_threads + 1)

    def client(ids: list[int], lane: int) -> None:
        q, want = group_inputs(setup, seqs, ids)
        ticket = opened.get(ids[0])

        def attend() -> Any:
            if ticket is not None:
                return ticket.attend(0, q)
            return coord.attend(0, ids, [1] * len(ids), q)

        # The group's steps, shared among its lanes.
        steps = _share(setup.steps, setup.depth, lane)
        try:
            errors.append(rel_err(attend(), want))
            for _ in range(setup.warmup_steps):
                attend()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)
        barrier.wait()
        barrier.wait()
        try:
            for _ in range(steps):
                attend()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
        barrier.wait()

    threads = [
        threading.Thread(target=client, args=(g, lane), daemon=True)
        for g in groups
        for lane in range(setup.depth)
    ]
    for t in threads:
        t.start()
    barrier.wait(timeout=BARRIER_TIMEOUT_S)  # warmed up
    progress(
        "  warm-up done (%d groups x %d threads); timing %d steps",
        len(groups),
        setup.depth,
        setup.steps,
    )
    profiled = profile_worker(coord, True)
    before = worker_times(coord)
    started = time.perf_counter()
    barrier.wait(timeout=BARRIER_TIMEOUT_S)
    barrier.wait(timeout=BARRIER_TIMEOUT_S)  # done
    seconds = time.perf_counter() - started
    after = worker_times(coord)
    profile_worker(coord, False, profiled)
    for t in threads:
        t.join()
    for ticket in opened.values():
        coord.close_ticket(ticket.ticket_id)
    if failures:
        raise failures[0]
    result = _decode_result(setup, len(groups), num_workers, seconds, before, after, errors)
    return result | {"threads_per_group": setup.depth}


def group_inputs(
    setup: Setup, seqs: dict[int, tuple[int, torch.Tensor]], ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A call group's q (seeded by its first sequence) and the output it must give: each
    sequence holds one V row, repeated over its query heads."""
    layout = setup.layout
    gen = torch.Generator().manual_seed(ids[0])
    q = torch.randn((len(ids), setup.num_q_heads, layout.head_dim), generator=gen)
    group_size = setup.num_q_heads // layout.num_kv_heads
    want = torch.stack([seqs[s][1].repeat_interleave(group_size, 0) for s in ids])
    return q.to(getattr(torch, layout.dtype)), want


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.float() - want.float()).abs().max() / want.float().abs().max())


def _groups(setup: Setup, seqs: dict[int, tuple[int, torch.Tensor]]) -> list[list[int]]:
    by_worker: dict[int, list[int]] = {}
    for sid, (worker_id, _) in sorted(seqs.items()):
        by_worker.setdefault(worker_id, []).append(sid)
    return [
        ids[i : i + setup.batch]
        for ids in by_worker.values()
        for i in range(0, len(ids), setup.batch)
    ]


class StepClient:
    """One client process of the ticket-driven decode: its group's calls, straight to the
    group's worker through a step ticket, ``depth`` in flight. (A Ray actor class.)"""

    def __init__(self) -> None:
        # A client only sends and receives: no GPU, one torch thread (a Ray actor that
        # asks for no CPU gets no thread limit, and every process here sees all GPUs).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(1)

    def run(
        self, ticket: Any, q: torch.Tensor, want: torch.Tensor, warmup: int, steps: int, depth: int
    ) -> dict[str, float]:
        err = rel_err(ticket.attend(0, q), want)
        for _ in range(warmup):
            ticket.attend(0, q)
        return {"err": err, **self.timed(ticket, q, steps, depth)}

    def timed(
        self,
        ticket: Any,
        q: torch.Tensor,
        steps: int,
        depth: int,
        start_at: float = 0.0,
        *,
        channel: bool = True,
        warm: int = 0,
    ) -> dict[str, float]:
        """``steps`` calls from wall-clock time ``start_at`` on: every client starts at
        once, so the window is not stretched by the actor calls' own start skew. Through
        the workers' local channels or Ray; ``warm`` untimed calls first."""
        from collections import deque

        for group in ticket.groups:
            group.handle.use_channel = channel
        for _ in range(warm):
            ticket.attend(0, q)
        time.sleep(max(0.0, start_at - time.time()))
        in_flight: deque[Any] = deque()
        start = time.time()
        for _ in range(steps):
            if len(in_flight) >= depth:
                ticket.wait(in_flight.popleft())
            in_flight.append(ticket.submit(0, q))
        while in_flight:
            ticket.wait(in_flight.popleft())
        return {"start": start, "end": time.time()}


def main_variant() -> Variant:
    """The ticket path as the service was started: its decode graphs, the local channel
    unless turned off in the clients' environment."""
    from kvservice.ticket_channel import enabled_by_env

    return Variant("main", enabled_by_env(), DECODE_GRAPHS or 0)


def decode_tickets(
    coord: Coordinator,
    setup: Setup,
    seqs: dict[int, tuple[int, torch.Tensor]],
    clients: list[Any],
    per_group: int | None = None,
    variants: list[Variant] | None = None,
) -> dict[str, dict[str, Any]]:
    """``steps`` decode steps over every sequence, ``clients_per_group`` client processes
    per call group (the group's steps split between them), each through the group's
    read-only step ticket (the coordinator plans each group once). Per variant (the
    main one alone by default) its figures; with several, their windows take turns and
    the workers' graphs are set for each."""
    import ray

    groups = _groups(setup, seqs)
    per_group = per_group or setup.clients_per_group
    if len(clients) < len(groups) * per_group:
        raise RuntimeError(
            f"{len(groups)} call groups x {per_group} but {len(clients)} client processes"
        )
    tickets = [coord.open_ticket(ids, [1] * len(ids), writes=False, ttl_s=3600) for ids in groups]
    try:
        args = [group_inputs(setup, seqs, ids) for ids in groups]
        # Client k serves group k // per_group and takes its share of the group's steps.
        lanes = [
            (
                clients[g * per_group + lane],
                tickets[g],
                args[g],
                _share(setup.steps, per_group, lane),
            )
            for g in range(len(groups))
            for lane in range(per_group)
        ]
        # Warm-up (and the check) in every client, then the timed steps all at once.
        warm = [
            c.run.remote(t, q, want, setup.warmup_steps, 0, setup.depth)
            for c, t, (q, want), _steps in lanes
        ]
        errors = [r["err"] for r in ray.get(warm, timeout=BARRIER_TIMEOUT_S)]
        progress("  warm-up done (%d client processes, %d calls in flight each); timing %d x %d steps",
                 len(lanes), setup.depth, setup.windows, setup.steps)  # fmt: skip
        profiled = profile_worker(coord, True)
        variants = variants or [main_variant()]
        windows: dict[str, list[float]] = {v.name: [] for v in variants}
        spent = {v.name: {"call": 0.0, "kernel": 0.0} for v in variants}
        for i in range(setup.windows):
            # Each round in another order, so no variant always follows the same one.
            for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
                for handle in coord._handles.values():
                    handle.call("set_decode_graphs", v.graphs)
                before = worker_times(coord)
                start_at = time.time() + CLIENT_START_DELAY_S
                timed = ray.get(
                    [
                        c.timed.remote(t, q, steps, setup.depth, start_at, channel=v.channel,
                                       warm=WARM_CALLS)
                        for c, t, (q, _want), steps in lanes
                    ],
                    timeout=BARRIER_TIMEOUT_S,
                )  # fmt: skip
                after = worker_times(coord)
                windows[v.name].append(
                    max(r["end"] for r in timed) - min(r["start"] for r in timed)
                )
                for key in ("call", "kernel"):
                    spent[v.name][key] += after[key] - before[key]
        profile_worker(coord, False, profiled)
    finally:
        for t in tickets:
            coord.close_ticket(t.ticket_id)
    num_workers = len({w for w, _ in seqs.values()})
    results = {}
    for v in variants:
        seconds = statistics.median(windows[v.name])
        result = _decode_result(
            setup, len(groups), num_workers, seconds, {"call": 0.0, "kernel": 0.0},
            spent[v.name], errors, windows[v.name],
        )  # fmt: skip
        results[v.name] = result | {
            "window_tokens_s": [setup.num_seqs * setup.steps / w for w in windows[v.name]],
            "clients": len(lanes),
            "clients_per_group": per_group,
            "calls_in_flight_per_client": setup.depth,
            "channel": v.channel,
            "decode_graphs": v.graphs,
        }
    return results


def _share(steps: int, lanes: int, lane: int) -> int:
    """Lane ``lane``'s share of ``steps`` split over ``lanes``."""
    return steps // lanes + (lane < steps % lanes)


def _decode_result(
    setup: Setup,
    num_groups: int,
    num_workers: int,
    seconds: float,
    before: dict[str, float],
    after: dict[str, float],
    errors: list[float],
    windows: list[float] | None = None,
) -> dict[str, Any]:
    """The decode's figures from ``seconds`` (the timed window; with several ``windows``,
    the median one); the workers' own times cover every window."""
    tokens = setup.num_seqs * setup.steps
    windows = windows or [seconds]
    calls = num_groups * setup.steps * len(windows)
    worker_call_s = after["call"] - before["call"]
    return {
        "calls_per_step": num_groups,
        "seconds": seconds,
        "tokens_s": tokens / seconds,
        "kv_read_gbps": tokens * setup.context * setup.layout.token_bytes / seconds / 1e9,
        # wall time per call per worker
        "call_ms": 1e3 * sum(windows) * num_workers / calls,
        # Inside the workers, summed over them: the attention calls and their kernels.
        "worker_call_s": worker_call_s,
        "worker_call_ms": 1e3 * worker_call_s / calls,
        "worker_kernel_s": after["kernel"] - before["kernel"],
        "kernel_share_pct": 100 * (after["kernel"] - before["kernel"]) / max(1e-9, worker_call_s),
        # The workers' busy share of the wall time: below 100 %, they waited for calls.
        "worker_busy_pct": 100 * worker_call_s / (sum(windows) * num_workers),
        # The decode kernels' share of the wall time (sampled on the device): how far
        # the GPUs were kept busy.
        "gpu_busy_pct": 100 * (after["kernel"] - before["kernel"]) / (sum(windows) * num_workers),
        "max_rel_err": max(errors),
        "ok": max(errors) <= (2e-2 if setup.layout.dtype == "bfloat16" else 1e-5),
    }


PROFILE_WORKERS = False  # --profile-workers (the profiler slows the calls it watches)
DECODE_GRAPHS: int | None = None  # --decode-graphs (None: the workers' default)


def profile_worker(coord: Coordinator, start: bool, worker_id: int | None = None) -> int | None:
    """With ``--profile-workers``: profile one worker's calls (the last one's) while a
    decode is timed; on stop, the table goes to stderr. None when not profiling."""
    if not PROFILE_WORKERS or (not start and worker_id is None):
        return None
    worker_id = max(coord._handles) if worker_id is None else worker_id
    actor = getattr(coord._handles[worker_id], "actor", None)
    if actor is None:
        return None
    import ray

    text = ray.get(actor.profile_calls.remote(start))
    if not start:
        lines = [line for line in (text or "").splitlines()[:36] if line.strip()]
        progress("  worker %d's calls, profiled:\n%s", worker_id, "\n".join(lines))
    return worker_id


def worker_times(coord: Coordinator) -> dict[str, float]:
    """Seconds the workers spent in attention calls and in their decode kernels."""
    stats = [h.call("stats") for h in coord._handles.values()]
    return {
        "call": sum(s["call_time"].get("attend", {}).get("seconds", 0.0) for s in stats),
        "kernel": sum(s["kernel_time"].get("paged_decode", {}).get("seconds", 0.0) for s in stats),
    }


class Phases:
    """Seconds per phase, each announced on stderr as it starts and ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        progress("%s: %s ...", self.name, phase)
        started = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - started
        progress("%s: %s done in %.1f s", self.name, phase, self.seconds[phase])


def report_decode(d: dict[str, Any]) -> None:
    progress("  %.0f tokens/s, %.2f ms per call per worker, workers busy %.0f %%, kernels %.0f %%",
             d["tokens_s"], d["call_ms"], d["worker_busy_pct"], d["gpu_busy_pct"])  # fmt: skip


def run_workers(
    setup: Setup,
    num_workers: int,
    use_gpu: bool,
    phases: set[str],
    result: dict[str, Any],
    saved: Callable[[], None],
    clients: list[Any],
) -> dict[str, Any]:
    """Fill ``result`` (already in the report) part by part, ``saved()`` after each."""
    phase = Phases(f"{num_workers} worker(s)")
    with phase("service start"):
        coord = start(setup.layout, num_workers, setup.num_gpu_blocks, use_gpu, f"w{num_workers}")
    result.update(workers=num_workers, phase_s=phase.seconds)
    try:
        with phase(f"fill ({setup.num_seqs} sequences)"):
            seqs = fill(coord, setup)
        placement: dict[str, int] = {}
        for worker_id, _ in seqs.values():
            placement[str(worker_id)] = placement.get(str(worker_id), 0) + 1
        result["placement"] = placement
        if "decode" in phases:
            variants = [main_variant(), *map(Variant.parse, setup.variants)]
            with phase("decode, client processes with step tickets"):
                timed = decode_tickets(coord, setup, seqs, clients, variants=variants)
            result["decode"] = timed.pop("main")
            if timed:
                result["decode_variants"] = timed
            saved()
            report_decode(result["decode"])
            for name, other in timed.items():
                progress("  variant %s:", name)
                report_decode(other)
            for per_group in setup.other_clients_per_group:
                # The same path with another number of client processes, for comparison.
                with phase(f"decode, {per_group} client processes per group"):
                    other = decode_tickets(coord, setup, seqs, clients, per_group)["main"]
                    result[f"decode_{per_group}_clients_per_group"] = other
                saved()
                report_decode(other)
            if setup.other_paths:
                other_paths(coord, setup, seqs, result, saved, phase)
        if "capacity" in phases:
            # The workload's sequences are of max_context tokens too: they count.
            with phase("capacity"):
                result["max_sequences"] = max_sequences(coord, setup, len(seqs))
            progress("  capacity %d sequences", result["max_sequences"])
        with phase("free"):
            coord.free(list(seqs))
    finally:
        with phase("stop"):
            coord.close()
    return result


def other_paths(
    coord: Coordinator,
    setup: Setup,
    seqs: dict[int, tuple[int, torch.Tensor]],
    result: dict[str, Any],
    saved: Callable[[], None],
    phase: Phases,
) -> None:
    """The decode off the ticket path of client processes, for comparison."""
    with phase("decode, every call through the coordinator"):
        result["decode_via_coordinator"] = decode(coord, setup, seqs)
    saved()
    report_decode(result["decode_via_coordinator"])
    with phase("decode, tickets from threads of this process"):
        result["decode_tickets_one_process"] = decode(coord, setup, seqs, tickets=True)
    saved()
    report_decode(result["decode_tickets_one_process"])


def median_seconds(fn: Any, iters: int) -> float:
    fn()  # warm-up (NCCL makes its communicator on the first send)
    times = []
    for _ in range(iters):
        start_t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start_t)
    return statistics.median(times)


# Other ways to cut and copy the same transfer (TransferGroup settings over the defaults;
# every chunked variant with peer copy off, which would otherwise take the transfer).
_CHUNKED = {"peer_copy": "off"}
TRANSFER_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("peer_copy_push", {"peer_copy": "push"}),
    ("peer_copy_pull", {"peer_copy": "pull"}),
    ("chunks_128MiB", _CHUNKED | {"chunk_bytes": 128 << 20, "first_chunk_bytes": None}),
    ("chunks_64MiB", _CHUNKED | {"chunk_bytes": 64 << 20, "first_chunk_bytes": None}),
    ("chunks_256MiB", _CHUNKED | {"chunk_bytes": 256 << 20, "first_chunk_bytes": None}),
    (
        "chunks_128MiB_from_64MiB",
        _CHUNKED | {"chunk_bytes": 128 << 20, "first_chunk_bytes": 64 << 20},
    ),
    ("block_messages", _CHUNKED | {"block_messages": True}),
    ("torch_index_copies", _CHUNKED | {"copier": "torch"}),
    ("copy_engine_copies", _CHUNKED | {"copier": "engine"}),
    ("copy_kernel_full_grid", _CHUNKED | {"copier": "triton", "copy_programs": None}),
)


def run_transfer(setup: Setup, use_gpu: bool) -> dict[str, Any]:
    layout = setup.transfer_layout
    phase = Phases("transfer")
    with phase("service start (2 workers, transfer group)"):
        coord = start(layout, 2, setup.transfer_pool_blocks, use_gpu, "transfer")
    try:
        group = coord.migrator.group
        handles = dict(coord._handles)
        assert group is not None and group.joined(0, 1), "no transfer group"
        gen = torch.Generator().manual_seed(1)
        n = setup.transfer_blocks
        src = torch.randperm(setup.transfer_pool_blocks, generator=gen)[:n].tolist()
        dst = torch.randperm(setup.transfer_pool_blocks, generator=gen)[:n].tolist()
        with phase(f"source blocks ({n * layout.block_bytes / 2**20:.0f} MiB) into worker 0"):
            data = torch.randn((n, *layout.block_shape), generator=gen).to(
                getattr(torch, layout.dtype)
            )
            handles[0].call("import_blocks", Tier.GPU, src, data)
        transfer = TransferBlocks(
            WorkerId(0), WorkerId(1),
            tuple((Tier.GPU, BlockId(s), Tier.GPU, BlockId(d)) for s, d in zip(src, dst, strict=True)),
        )  # fmt: skip
        num_bytes = n * layout.block_bytes

        paths: set[str] = set()

        def by_group() -> None:
            calls: list[Any] = []
            paths.add(submit_transfer(transfer, handles, group, calls))
            resolve_all(calls)

        def through_host() -> None:
            calls: list[Any] = []
            assert submit_transfer(transfer, handles, None, calls) == "host"
            resolve_all(calls)

        probe_in_worker: list[float] = []

        def plain() -> None:
            seconds = resolve_all([
                handles[0].submit("transfer_probe", group.ranks[1], num_bytes, True, 1),
                handles[1].submit("transfer_probe", group.ranks[0], num_bytes, False, 1),
            ])  # fmt: skip
            probe_in_worker.append(max(seconds))  # the later side's loop

        # The last block_seconds' median ms from the driver's first step to each moment.
        timeline: dict[str, float] = {}

        def block_seconds() -> tuple[float, float]:
            """Median seconds of the block transfer timed from here (two actor calls) and
            inside the workers (the driver's calls left out: a transfer lasts as long as
            its longer side, from the call's start to its end), from the same transfers."""
            by_group()  # warm-up (a new group's communicator, its staging buffers)
            here, inside = [], []
            moments: dict[str, list[float]] = {}
            for _ in range(setup.iters):
                start_t, at = time.perf_counter(), time.monotonic()
                calls: list[Any] = []
                paths.add(submit_transfer(transfer, handles, group, calls))
                submitted = time.monotonic()
                resolve_all(calls)
                here.append(time.perf_counter() - start_t)
                returned = time.monotonic()
                send = handles[0].call("transfer_info")["last_ms"]["send"]
                recv = handles[1].call("transfer_info")["last_ms"]["recv"]
                inside.append(max(send["total"], recv["total"]) / 1e3)
                # One host clock (time.monotonic) for the driver and both workers.
                for name, moment in (
                    ("submitted", submitted),
                    ("recv_started", recv["started_s"]),
                    ("send_started", send["started_s"]),
                    ("recv_ended", recv["started_s"] + recv["total"] / 1e3),
                    ("send_ended", send["started_s"] + send["total"] / 1e3),
                    ("returned", returned),
                ):
                    moments.setdefault(name, []).append(1e3 * (moment - at))
            timeline.clear()
            timeline.update({k: round(statistics.median(v), 3) for k, v in moments.items()})
            return statistics.median(here), statistics.median(inside)

        with phase("plain send/recv and block transfer"):
            plain_s = median_seconds(plain, setup.iters)
            block_s, block_in_worker_s = block_seconds()
            default_timeline = dict(timeline)
            plain_s = min(plain_s, median_seconds(plain, setup.iters))  # either side of it
        progress("  block transfer timeline, median ms from the driver's start: %s", timeline)
        progress(
            "  blocks %.1f GB/s, plain send/recv %.1f GB/s",
            num_bytes / block_s / 1e9,
            num_bytes / plain_s / 1e9,
        )
        in_worker = {
            "block_transfer_gbps": num_bytes / block_in_worker_s / 1e9,
            "nccl_send_recv_gbps": num_bytes / statistics.median(probe_in_worker) / 1e9,
            "block_over_nccl_pct": 100 * statistics.median(probe_in_worker) / block_in_worker_s,
        }
        progress(
            "  inside the workers: blocks %.1f GB/s, plain send/recv %.1f GB/s (%.0f %%)",
            in_worker["block_transfer_gbps"], in_worker["nccl_send_recv_gbps"],
            in_worker["block_over_nccl_pct"],
        )  # fmt: skip
        # Where the last block transfer's host time went, on each side, and how much later
        # than the sender the receiver began (one host clock: time.monotonic).
        phases_ms = {
            "send": handles[0].call("transfer_info")["last_ms"].get("send"),
            "recv": handles[1].call("transfer_info")["last_ms"].get("recv"),
        }
        if phases_ms["send"] and phases_ms["recv"]:
            sent_at, received_at = (phases_ms[k].pop("started_s") for k in ("send", "recv"))
            phases_ms["recv_started_after_send"] = round(1e3 * (received_at - sent_at), 3)
        progress("  last block transfer, host ms per phase: %s", phases_ms)
        variants: dict[str, float] = {}
        variants_in_worker: dict[str, float] = {}
        variant_timelines: dict[str, dict[str, float]] = {}
        with phase("chunk size and message variants"):
            knobs = (
                "chunk_bytes",
                "first_chunk_bytes",
                "block_messages",
                "copier",
                "copy_programs",
                "peer_copy",
            )
            default = {k: getattr(group, k) for k in knobs}
            for name, change in TRANSFER_VARIANTS:
                for k, v in (default | change).items():
                    setattr(group, k, v)
                coord.form_transfer_group()
                variant_s, variant_in_worker_s = block_seconds()
                variants[name] = num_bytes / variant_s / 1e9
                variants_in_worker[name] = num_bytes / variant_in_worker_s / 1e9
                variant_timelines[name] = dict(timeline)
                progress("  %s: %.1f GB/s (inside the workers %.1f GB/s), timeline %s", name,
                         variants[name], variants_in_worker[name], timeline)  # fmt: skip
            for k, v in default.items():
                setattr(group, k, v)
            coord.form_transfer_group()
            # The link itself with the default chunk's message size: 1 GiB as 16 messages.
            pieces = max(1, num_bytes // group.chunk_bytes)

            def plain_pieces() -> None:
                resolve_all([
                    handles[0].submit("transfer_probe", group.ranks[1], num_bytes, True, 1, pieces),
                    handles[1].submit("transfer_probe", group.ranks[0], num_bytes, False, 1, pieces),
                ])  # fmt: skip

            variants[f"plain_in_{pieces}_messages"] = (
                num_bytes / median_seconds(plain_pieces, setup.iters) / 1e9
            )
            progress("  plain send/recv in %d messages: %.1f GB/s", pieces,
                     variants[f"plain_in_{pieces}_messages"])  # fmt: skip
        with phase("check the moved blocks"):
            # The default path's copy, and the chunked one's when the default is peer copy.
            default_paths, ok = sorted(paths), True
            for peer_copy in (group.peer_copy, "off"):
                group.peer_copy = peer_copy
                coord.form_transfer_group()
                handles[1].call("import_blocks", Tier.GPU, dst, torch.zeros_like(data))
                paths.clear()
                by_group()
                moved = handles[1].call("export_blocks", Tier.GPU, dst)
                ok = ok and bool(torch.equal(moved, data))
                progress("  moved blocks checked over the %s path: %s", paths.pop(), ok)
            group.peer_copy = default["peer_copy"]
            coord.form_transfer_group()
        # The same path over more bytes: the fixed costs of a transfer (the two actor
        # calls, checking and indexing the blocks) weigh less. Sources repeat (a block
        # may be sent several times); destinations are distinct.
        times = max(1, min(4, setup.transfer_pool_blocks // n))
        with phase(f"a {times}x bigger transfer"):
            big_src = [src[i] for i in torch.randint(0, n, (n * times,), generator=gen).tolist()]
            big_dst = torch.randperm(setup.transfer_pool_blocks, generator=gen)[: n * times]
            big = TransferBlocks(
                WorkerId(0), WorkerId(1),
                tuple((Tier.GPU, BlockId(s), Tier.GPU, BlockId(int(d)))
                      for s, d in zip(big_src, big_dst, strict=True)),
            )  # fmt: skip
            big_bytes = num_bytes * times

            def big_by_group() -> None:
                calls: list[Any] = []
                submit_transfer(big, handles, group, calls)
                resolve_all(calls)

            def big_plain() -> None:
                resolve_all([
                    handles[0].submit("transfer_probe", group.ranks[1], big_bytes, True, 1),
                    handles[1].submit("transfer_probe", group.ranks[0], big_bytes, False, 1),
                ])  # fmt: skip

            big_plain_s = median_seconds(big_plain, setup.iters)
            big_block_s = median_seconds(big_by_group, setup.iters)
        bigger = {
            "blocks": n * times,
            "bytes": big_bytes,
            "block_transfer_gbps": big_bytes / big_block_s / 1e9,
            "nccl_send_recv_gbps": big_bytes / big_plain_s / 1e9,
            "block_over_nccl_pct": 100 * big_plain_s / big_block_s,
        }
        progress("  %d blocks: blocks %.1f GB/s, plain %.1f GB/s (%.0f %%)", n * times,
                 bigger["block_transfer_gbps"], bigger["nccl_send_recv_gbps"],
                 bigger["block_over_nccl_pct"])  # fmt: skip
        with phase("through host memory"):
            host_s = median_seconds(through_host, 1)
        # A whole migration through the coordinator: sequences over about the same blocks.
        per_seq = max(1, n // 8)
        seq_ids = [
            coord.create_sequence(
                range(i * per_seq * layout.block_size, (i + 1) * per_seq * layout.block_size)
            ).seq_id
            for i in range(8)
        ]
        on_0 = [s for s in seq_ids if coord.get_sequence(s).worker_id == 0]
        with phase("migration"):
            migration = coord.migrate(on_0, 1) if on_0 else {"bytes": 0, "seconds": 0.0}
        coord.free(seq_ids)
        return {
            "workers": 2,
            "backend": group.backend,
            "blocks": n,
            "block_bytes": layout.block_bytes,
            "bytes": num_bytes,
            "block_transfer_gbps": num_bytes / block_s / 1e9,
            "nccl_send_recv_gbps": num_bytes / plain_s / 1e9,
            "block_over_nccl_pct": 100 * plain_s / block_s,
            "last_transfer_host_ms": phases_ms,
            "timeline_ms": default_timeline,
            "bigger": bigger,
            "copier": group.copier,
            "copy_programs": group.copy_programs,
            "peer_copy": group.peer_copy,
            "paths": default_paths,
            "variants_gbps": variants,
            "variants_in_worker_gbps": variants_in_worker,
            "variant_timelines_ms": variant_timelines,
            "in_worker": in_worker,
            "host_path_gbps": num_bytes / host_s / 1e9,
            "migration_gbps": migration["bytes"] / migration["seconds"] / 1e9
            if migration["seconds"]
            else None,
            "migration_bytes": migration["bytes"],
            "ok": ok,
            "phase_s": phase.seconds,
        }
    finally:
        with phase("stop"):
            coord.close()


TARGETS = {"decode_2_over_1": 1.9, "decode_4_over_1": 3.6, "block_over_nccl_pct": 80.0}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios, targets met and checks of what the report holds so far (also a partial one)."""
    runs = report["runs"]
    base = runs[0] if runs else {}
    met: dict[str, bool] = {}
    checks: list[bool] = []
    for r in runs:
        d = r.get("decode")
        if d is not None and "decode" in base:
            d["tokens_s_over_1"] = d["tokens_s"] / base["decode"]["tokens_s"]
            target = TARGETS.get(f"decode_{r['workers']}_over_1")
            if target is not None and base is not r:
                met[f"decode_{r['workers']}_over_1"] = d["tokens_s_over_1"] >= target
        if d is not None:
            checks.append(d["ok"])
        if "max_sequences" in r and "max_sequences" in base:
            r["max_sequences_over_1"] = r["max_sequences"] / base["max_sequences"]
    transfer = report.get("transfer")
    if transfer is not None:
        met["block_over_nccl"] = transfer["block_over_nccl_pct"] >= TARGETS["block_over_nccl_pct"]
        checks.append(transfer["ok"])
    report["met"] = met
    report["ok"] = all(checks)
    return report


def save(report: dict[str, Any], out: Path | None) -> None:
    """Write the report so far (a run cut short still leaves what it measured)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(summarize(report), indent=2) + "\n")
    partial.replace(out)


def run(
    setup: Setup, counts: list[int], phases: set[str], out: Path | None = None
) -> dict[str, Any]:
    progress("ray init ...")
    # q and the output of a decode call (512 KiB each at the GPU shapes) go inline with
    # the call and its reply instead of through the object store.
    os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
    num_gpus = init_ray_for_checkout(NAMESPACE, log_to_driver=False, env_vars=TRANSFER_ENV)
    progress("ray up: %d GPU(s)", num_gpus)
    # A hard timeout's SIGTERM shows where every thread was, then goes on to Ray's handler
    # (registered after ray.init, which installs its own).
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    use_gpu = num_gpus > 0
    report: dict[str, Any] = {
        "benchmark": "scaling",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0) if use_gpu else platform.processor() or "cpu",
        "gpus": num_gpus,
        "host": platform.node(),
        "versions": versions(),
        "setup": {
            **asdict(setup),
            "layout": setup.layout.key(),
            "transfer_layout": setup.transfer_layout.key(),
        },
        "phases": sorted(phases),
        "inline_bytes": int(os.environ["RAY_max_direct_call_object_size"]),
        "runs": [],
        "transfer": None,
        "targets": TARGETS,
    }
    clients: list[Any] = []
    if "decode" in phases:
        import ray

        progress("client processes ...")
        actor = ray.remote(num_cpus=0)(StepClient)
        num_groups = -(-setup.num_seqs // setup.batch)
        most = max((setup.clients_per_group, *setup.other_clients_per_group))
        clients = [actor.remote() for _ in range(num_groups * most)]
        ray.get([c.__ray_ready__.remote() for c in clients], timeout=BARRIER_TIMEOUT_S)
        progress("client processes up: %d", len(clients))
    if phases & {"decode", "capacity"}:
        for w in counts:
            result: dict[str, Any] = {"workers": w}
            report["runs"].append(result)
            run_workers(setup, w, use_gpu, phases, result, lambda: save(report, out), clients)
            save(report, out)
    if "transfer" in phases and max(counts) >= 2:
        report["transfer"] = run_transfer(setup, use_gpu)
        save(report, out)
    progress("done")
    return summarize(report)


def table(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"scaling on {report['card']} x{report['gpus']}: {setup['num_seqs']} sequences x "
        f"{setup['context']} tokens ({setup['layout']}), batch {setup['batch']}, "
        f"{setup['steps']} steps, {setup['depth']} calls in flight per client, "
        f"{setup.get('clients_per_group', 1)} client processes per group; checks "
        f"{'ok' if report['ok'] else 'FAILED'}",
        f"{'workers':>8}{'tokens/s':>12}{'KV GB/s':>10}{'x 1 worker':>12}{'ms/call':>9}"
        f"{'busy %':>8}{'kernel %':>10}{'via coord':>11}{'max seqs':>10}{'x 1 worker':>12}"
        "  placement",
    ]
    for r in report["runs"]:
        d = r.get("decode")
        cells = (
            f"{d['tokens_s']:>12.0f}{d['kv_read_gbps']:>10.1f}{d.get('tokens_s_over_1', 1.0):>12.2f}"
            f"{d['call_ms']:>9.2f}{d['worker_busy_pct']:>8.0f}{d['kernel_share_pct']:>10.0f}"
            if d
            else f"{'-':>12}{'-':>10}{'-':>12}{'-':>9}{'-':>8}{'-':>10}"
        )
        via = r.get("decode_via_coordinator")
        cells += f"{via['tokens_s']:>11.0f}" if via else f"{'-':>11}"
        cap = (
            f"{r['max_sequences']:>10}{r.get('max_sequences_over_1', 1.0):>12.2f}"
            if "max_sequences" in r
            else f"{'-':>10}{'-':>12}"
        )
        lines.append(f"{r['workers']:>8}{cells}{cap}  {r.get('placement', '-')}")
    for name in sorted({n for r in report["runs"] for n in r.get("decode_variants", {})}):
        rows = [(r["workers"], r["decode_variants"][name]) for r in report["runs"]
                if name in r.get("decode_variants", {})]  # fmt: skip
        base = rows[0][1]["tokens_s"] if rows and rows[0][0] == 1 else None
        lines.append(
            f"  variant {name} (windows in turn with the main one): "
            + ", ".join(
                f"{w} worker(s) {d['tokens_s']:.0f} tokens/s"
                + (f" ({d['tokens_s'] / base:.2f}x)" if base else "")
                + f", {d['call_ms']:.2f} ms/call, GPU busy {d.get('gpu_busy_pct', 0):.0f} %"
                for w, d in rows
            )
        )
    for key in sorted({k for r in report["runs"] for k in r if k.endswith("_clients_per_group")}):
        per_group = key.removeprefix("decode_").removesuffix("_clients_per_group")
        base = next((r[key]["tokens_s"] for r in report["runs"] if key in r), None)
        lines.append(
            f"  ticket path with {per_group} client process(es) per group: "
            + ", ".join(
                f"{r['workers']} worker(s) {r[key]['tokens_s']:.0f} tokens/s "
                f"({r[key]['tokens_s'] / base:.2f}x)"
                for r in report["runs"]
                if key in r and base
            )
        )
    for r in report["runs"]:
        lines.append(
            f"  {r['workers']} worker(s) phases: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in r.get("phase_s", {}).items())
        )
    t = report["transfer"]
    if t:
        lines.append(
            f"transfer of {t['blocks']} blocks ({t['bytes'] / 2**20:.0f} MiB, {t['backend']}): "
            f"blocks {t['block_transfer_gbps']:.1f} GB/s, plain send/recv "
            f"{t['nccl_send_recv_gbps']:.1f} GB/s = {t['block_over_nccl_pct']:.0f} %; "
            f"through host {t['host_path_gbps']:.1f} GB/s; migration "
            + (f"{t['migration_gbps']:.1f} GB/s" if t["migration_gbps"] else "-")
        )
        big = t.get("bigger")
        if big:
            lines.append(
                f"  {big['blocks']} blocks ({big['bytes'] / 2**20:.0f} MiB): blocks "
                f"{big['block_transfer_gbps']:.1f} GB/s, plain send/recv "
                f"{big['nccl_send_recv_gbps']:.1f} GB/s = {big['block_over_nccl_pct']:.0f} %"
            )
        lines.append(
            "  transfer phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in t["phase_s"].items())
        )
    lines.append(
        "targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["met"].items())
    )
    return "\n".join(lines)


PHASES = ("decode", "capacity", "transfer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--profile-workers", action="store_true",
        help="cProfile one worker's calls in each timed decode (stderr; slows those calls)",
    )  # fmt: skip
    parser.add_argument("--small", action="store_true", help="the small CPU shapes even on a GPU")
    parser.add_argument(
        "--decode-graphs", type=int, default=None,
        help="CUDA graphs kept per worker for ticket decode calls (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default="",
        help="ticket-path variants timed in turn with the main one, e.g. ray,ray+graphs "
        "(ray|channel, +graphs for decode graphs)",
    )  # fmt: skip
    parser.add_argument(
        "--ticket-only", action="store_true",
        help="leave out the decode through the coordinator and from the driver's threads",
    )  # fmt: skip
    parser.add_argument("--workers", default=None, help="worker counts, e.g. 1,2,4")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps")
    parser.add_argument(
        "--depth", type=int, default=None, help="client threads (calls in flight) per call group"
    )
    parser.add_argument(
        "--clients-per-group", type=int, default=None,
        help="client processes per call group on the ticket path (the steps split between them)",
    )  # fmt: skip
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"which of {','.join(PHASES)} to run (comma-separated)",
    )
    parser.add_argument("--skip-capacity", action="store_true", help="leave out the capacity count")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the JSON here (after each part)"
    )
    parser.add_argument(
        "--table-from", type=Path, default=None, help="only print the table of this JSON"
    )
    args = parser.parse_args(argv)
    global PROFILE_WORKERS, DECODE_GRAPHS
    PROFILE_WORKERS = args.profile_workers
    DECODE_GRAPHS = args.decode_graphs
    if args.table_from:
        print(table(summarize(json.loads(args.table_from.read_text()))))
        return 0
    phases = {p for p in args.phases.split(",") if p}
    if phases - set(PHASES):
        parser.error(f"unknown phases {sorted(phases - set(PHASES))}")
    if args.skip_capacity:
        phases.discard("capacity")
    gpus = torch.cuda.device_count()
    setup = SMALL_SETUP if args.small or not gpus else GPU_SETUP
    if args.steps:
        setup = replace(setup, steps=args.steps)
    if args.depth:
        setup = replace(setup, depth=args.depth)
    if args.clients_per_group:
        setup = replace(setup, clients_per_group=args.clients_per_group)
    if args.variants:
        try:
            variants = tuple(Variant.parse(v).name for v in args.variants.split(",") if v)
        except ValueError as exc:
            parser.error(str(exc))
        setup = replace(setup, variants=variants)
    if args.ticket_only:
        setup = replace(setup, other_paths=False)
    if args.workers:
        counts = [int(w) for w in args.workers.split(",")]
    else:
        counts = [w for w in (1, 2, 4) if w <= gpus] if gpus else [1, 2]
    report = run(setup, counts, phases, args.out)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if args.json else table(report))
    if args.json:
        print(table(report), file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
