"""``kvservice bench load``: many concurrent clients driving a mixed workload over gRPC.

Each client is an asyncio task with its own channel, acting for one of a few tenants
(each with a shared system prompt, so prompts hit the prefix cache). It keeps a handful
of live sequences and loops: create a sequence and prefill it (Attend with the prompt's
uncached tokens and their K/V, every layer), decode steps over all of its sequences
(AppendTokens, then Attend with q_len 1 and the new K/V, every layer), fork one into
two children that then diverge (copy on write), free one. A sequence whose call fails
is freed and forgotten, so one refusal never cascades into others.

Reported: ops/s and p50/p99 latency per operation, errors by status code (expected:
only RESOURCE_EXHAUSTED, when the small device tier is full and nothing can swap), and
whether the blocks in use came back to their starting level once every client freed
what it held. The check fails (exit 1) on any other error or on leaked blocks.

Clients and, by default, the server share this process (the server on its own thread
and thread pool): on a small machine the numbers are the whole system's, not the
server's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from kvservice.core.errors import KVServiceError, ResourceExhausted
from kvservice.core.layout import Layout
from kvservice.grpc_client import AsyncGrpcTransport, GrpcTransport
from kvservice.metrics import error_code

EXPECTED_ERRORS = frozenset({"RESOURCE_EXHAUSTED"})
NUM_TENANTS = 4
SYSTEM_PROMPT_TOKENS = 48
LIVE_PER_CLIENT = 3
MAX_LIVE_PER_CLIENT = 6
MAX_LENGTH = 400
NUM_Q_HEADS_PER_KV = 2
CALL_TIMEOUT_S = 120.0
VOCAB = 32_000


@dataclass
class _Seq:
    seq_id: int
    length: int


@dataclass
class LoadStats:
    """Latencies (seconds) per operation and errors per (operation, code)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)


class _Client:
    def __init__(
        self, index: int, address: str, token: str | None, layout: Layout, stats: LoadStats, seed: int
    ) -> None:
        self.tenant = f"load-{index % NUM_TENANTS}"
        self.transport = AsyncGrpcTransport(address, token=token, timeout=CALL_TIMEOUT_S)
        self.layout = layout
        self.stats = stats
        self.rng = random.Random(seed * 1_000_003 + index)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        self.live: list[_Seq] = []
        system = random.Random(index % NUM_TENANTS)
        self.system_prompt = [system.randrange(VOCAB) for _ in range(SYSTEM_PROMPT_TOKENS)]

    async def timed(self, op: str, call: Any) -> Any:
        """Await ``call``; its latency is recorded, an error counted and re-raised."""
        start = time.perf_counter()
        try:
            result = await call
        except (KVServiceError, grpc.RpcError) as exc:
            code = error_code(exc) if isinstance(exc, KVServiceError) else exc.code().name
            self.stats.errors[(op, code)] += 1
            raise
        self.stats.latencies[op].append(time.perf_counter() - start)
        return result

    def _rows(self, rows: int, heads: int) -> torch.Tensor:
        shape = (rows, heads, self.layout.head_dim)
        return torch.randn(shape, generator=self.gen).to(getattr(torch, self.layout.dtype))

    async def _attend(self, op: str, seqs: list[_Seq], q_lens: list[int]) -> None:
        rows = sum(q_lens)
        kv = self.layout.num_kv_heads
        ids = [s.seq_id for s in seqs]
        for layer in range(self.layout.num_layers):
            q = self._rows(rows, kv * NUM_Q_HEADS_PER_KV)
            k, v = self._rows(rows, kv), self._rows(rows, kv)
            await self.timed(op, self.transport.attend(layer, ids, q_lens, q, k, v, tenant=self.tenant))

    async def _drop(self, seqs: list[_Seq]) -> None:
        """Free sequences whose last call failed (their K/V may be half written)."""
        for seq in seqs:
            if seq in self.live:
                self.live.remove(seq)
        if seqs:
            try:
                await self.timed("free", self.transport.free([s.seq_id for s in seqs], tenant=self.tenant))
            except ResourceExhausted:
                pass

    async def create(self) -> None:
        suffix = [self.rng.randrange(VOCAB) for _ in range(self.rng.randrange(16, 160))]
        info = await self.timed(
            "create", self.transport.create_sequence(self.system_prompt + suffix, tenant=self.tenant)
        )
        seq = _Seq(info.seq_id, info.length)
        self.live.append(seq)
        try:
            await self._attend("prefill", [seq], [info.length - info.num_cached_tokens])
        except (KVServiceError, grpc.RpcError):
            await self._drop([seq])
            raise

    async def decode_step(self) -> None:
        seqs = list(self.live)
        tokens = [[self.rng.randrange(VOCAB)] for _ in seqs]
        try:
            await self.timed(
                "append",
                self.transport.append_tokens([s.seq_id for s in seqs], tokens, tenant=self.tenant),
            )
            for seq in seqs:
                seq.length += 1
            await self._attend("attend", seqs, [1] * len(seqs))
        except (KVServiceError, grpc.RpcError):
            await self._drop(seqs)
            raise
        await self._drop([s for s in seqs if s.length >= MAX_LENGTH])

    async def fork(self) -> None:
        parent = self.rng.choice(self.live)
        children = await self.timed("fork", self.transport.fork(parent.seq_id, 2, tenant=self.tenant))
        self.live += [_Seq(c, parent.length) for c in children]

    async def free_one(self) -> None:
        seq = self.live.pop(self.rng.randrange(len(self.live)))
        await self.timed("free", self.transport.free([seq.seq_id], tenant=self.tenant))

    async def run(self, deadline: float) -> None:
        try:
            while time.perf_counter() < deadline:
                try:
                    await self.one_op()
                except ResourceExhausted:
                    if self.live:  # make room before trying again
                        await self._drop([self.rng.choice(self.live)])
                    await asyncio.sleep(0.001)
                except (KVServiceError, grpc.RpcError):
                    await asyncio.sleep(0.001)  # counted; the sequences involved are dropped
            while self.live:
                await self._drop(self.live[:8])
        finally:
            await self.transport.close()

    async def one_op(self) -> None:
        if len(self.live) < LIVE_PER_CLIENT:
            await self.create()
            return
        r = self.rng.random()
        if r < 0.75:
            await self.decode_step()
        elif r < 0.85 and len(self.live) < MAX_LIVE_PER_CLIENT:
            await self.fork()
        else:
            await self.free_one()


def blocks_used(stats: dict[str, Any]) -> tuple[int, int]:
    """(used, cached) blocks over every worker and tier, from ``stats()``."""
    used = cached = 0
    for worker in stats["workers"].values():
        for counts in worker["tiers"].values():
            used += counts["used"]
            cached += counts["cached"]
    return used, cached


def run_load(
    address: str | None = None,
    *,
    clients: int = 32,
    seconds: float = 60.0,
    seed: int = 0,
    token: str | None = None,
    num_gpu_blocks: int = 1024,
) -> dict[str, Any]:
    """Drive the workload against ``address`` (or our own server); the report as a dict."""
    from kvservice.bench.target import embedded_service

    def build() -> Any:
        return embedded_service(
            "tiny", block_size=16, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_gpu_blocks
        )

    threads = torch.get_num_threads()
    if address is None:
        # The workers' CPU kernels run on tiny tensors from many threads at once: torch's
        # intra-op threads would only contend for the same cores (several times slower).
        torch.set_num_threads(1)
    try:
        return _run(address, token, build, clients, seconds, seed)
    finally:
        torch.set_num_threads(threads)


def _run(
    address: str | None, token: str | None, build: Any, clients: int, seconds: float, seed: int
) -> dict[str, Any]:
    from kvservice.bench.target import open_target

    with open_target(address, token=token, build=build) as target:
        with GrpcTransport(target.address, token=token, timeout=CALL_TIMEOUT_S) as admin:
            layout = admin.layout()
            used_start, cached_start = blocks_used(admin.stats())
            stats = LoadStats()
            start = time.perf_counter()
            asyncio.run(_drive(target.address, token, layout, stats, clients, seconds, seed))
            elapsed = time.perf_counter() - start
            used_end, cached_end = blocks_used(admin.stats())
        invariants = None
        if target.coordinator is not None:
            target.coordinator.check_invariants()  # AssertionError if the books are broken
            invariants = True
    report = _report(stats, elapsed, clients, target.address if address else "own", layout,
                     (used_start, cached_start, used_end, cached_end))  # fmt: skip
    report["invariants_checked"] = invariants
    return report


async def _drive(
    address: str, token: str | None, layout: Layout, stats: LoadStats, clients: int, seconds: float, seed: int
) -> None:
    workers = [_Client(i, address, token, layout, stats, seed) for i in range(clients)]
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(w.run(deadline) for w in workers))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _report(
    stats: LoadStats,
    elapsed: float,
    clients: int,
    server: str,
    layout: Layout,
    memory: tuple[int, int, int, int],
) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    total = 0
    for op in sorted(set(stats.latencies) | {op for op, _ in stats.errors}):
        values = sorted(stats.latencies.get(op, []))
        errors = {code: n for (o, code), n in sorted(stats.errors.items()) if o == op}
        total += len(values)
        ops[op] = {
            "ok": len(values),
            "ops_per_s": round(len(values) / elapsed, 1),
            "p50_ms": round(1e3 * _percentile(values, 0.5), 3),
            "p99_ms": round(1e3 * _percentile(values, 0.99), 3),
            "errors": errors,
        }
    expected: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for (_op, code), n in stats.errors.items():
        (expected if code in EXPECTED_ERRORS else unexpected)[code] += n
    used_start, cached_start, used_end, cached_end = memory
    returned = used_end == used_start
    return {
        "server": server,
        "layout": str(layout.key()),
        "clients": clients,
        "seconds": round(elapsed, 2),
        "ops": total,
        "ops_per_s": round(total / elapsed, 1),
        "per_op": ops,
        "errors": {"expected": dict(expected), "unexpected": dict(unexpected)},
        "memory": {
            "used_blocks_start": used_start,
            "used_blocks_end": used_end,
            "cached_blocks_start": cached_start,
            "cached_blocks_end": cached_end,
            "returned": returned,
        },
        "ok": returned and not unexpected,
    }


def main(args: argparse.Namespace) -> int:
    result = run_load(
        args.address, clients=args.clients, seconds=args.seconds, seed=args.seed,
        token=args.token, num_gpu_blocks=args.num_gpu_blocks,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0 if result["ok"] else 1


def _print_table(result: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(
        f"load: {result['clients']} clients, {result['seconds']} s, {result['ops']} ops "
        f"({result['ops_per_s']}/s) against {result['server']}\n"
    )
    out.write(f"  {'op':<10}{'ok':>8}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}  errors\n")
    for op, row in result["per_op"].items():
        out.write(
            f"  {op:<10}{row['ok']:>8}{row['ops_per_s']:>10}{row['p50_ms']:>10}{row['p99_ms']:>10}"
            f"  {row['errors'] or ''}\n"
        )
    memory = result["memory"]
    out.write(
        f"errors: expected {result['errors']['expected']}, unexpected {result['errors']['unexpected']}\n"
        f"blocks used: {memory['used_blocks_start']} at start, {memory['used_blocks_end']} at the end "
        f"({'returned' if memory['returned'] else 'LEAKED'}); cached at the end {memory['cached_blocks_end']}\n"
    )
