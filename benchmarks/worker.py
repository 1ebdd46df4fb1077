"""Worker actors under Ray: round trips checked against the references, and what an actor
call costs next to the kernel it wraps.

    python -m benchmarks.worker [--json] [--small] [--iters N] [--workers N] [--out FILE]

Starts Ray (``ray.init(num_gpus=<visible GPUs>)`` unless already connected) and one
worker actor per visible GPU through a placement group, or one CPU worker when there is
no GPU (the CPU run uses a small fp32 shape: a check that everything works, not a GPU
figure). For each worker, first the checks, each against the kernels' torch references
computed on the driver from its own copy of the K/V:

- write K/V of a decode batch, then decode attention with the step's K/V written first;
- extend (a prefill chunk after a cached prefix) with fused write, out and lse;
- copy-on-write of blocks (exported copies equal their sources);
- swap out to the host tier and back into other device blocks (bytes unchanged).

Then the timings, per operation over ``--iters`` calls after warm-up: the actor round
trip as the driver sees it (``ray.get`` of one call, tensors in and out), the host time
inside the worker's method, and the kernel time (CUDA events on the worker; wall clock
on the CPU). ``overhead_us`` = round trip - time in the method: Ray's scheduling,
serialization and transfer of the arguments and result. ``info`` is a call with no
tensors and no kernel, the floor of any call. Exit status 1 when a check fails.

Runs from a checkout without installing the package: when ``kvservice.workers`` does
not import, a path finder maps ``kvservice.kernels``/``kvservice.workers`` onto the
``kernels/``/``workers/`` folders (as the editable install does), here and in Ray's
worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
_MAPPED = {"kvservice.kernels": ROOT / "kernels", "kvservice.workers": ROOT / "workers"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the packages pyproject maps into ``kvservice`` when nothing is installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        folder = _MAPPED.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install_checkout_finder() -> None:
    """Make ``kvservice.*`` importable from this checkout (also Ray's worker-setup hook)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("kvservice.workers") is None and not any(
        isinstance(f, _CheckoutFinder) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _CheckoutFinder())


install_checkout_finder()

import kvservice.kernels as kernels  # noqa: E402
from kvservice.workers import AttendPlan, start_worker_actors, stop_worker_actors  # noqa: E402
from kvservice.workers.pools import torch_dtype  # noqa: E402

from kvservice.core.ids import Tier  # noqa: E402
from kvservice.core.layout import Layout  # noqa: E402

NAMESPACE = "kvservice-bench"


@dataclass(frozen=True, slots=True)
class Setup:
    layout: Layout
    num_q_heads: int
    decode_batch: int  # sequences in a decode step
    decode_context: int  # tokens each already holds
    extend_batch: int  # sequences in a prefill chunk
    extend_cached: int  # tokens already cached before the chunk
    extend_new: int  # new tokens per sequence in the chunk
    cow_blocks: int
    swap_blocks: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    iters: int
    warmup: int
    rtol: float  # max |got - want| over max |want|


# Llama-3-8B KV shape (32 layers, 8 KV heads of 128, bf16): one block is 2 MiB.
GPU_SETUP = Setup(
    layout=Layout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16),
    num_q_heads=32,
    decode_batch=32,
    decode_context=1024,
    extend_batch=4,
    extend_cached=512,
    extend_new=512,
    cow_blocks=64,
    swap_blocks=256,
    num_gpu_blocks=3072,
    num_cpu_blocks=512,
    iters=50,
    warmup=5,
    rtol=2e-2,
)
SMALL_SETUP = Setup(
    layout=Layout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32", block_size=16),
    num_q_heads=8,
    decode_batch=8,
    decode_context=256,
    extend_batch=2,
    extend_cached=64,
    extend_new=64,
    cow_blocks=16,
    swap_blocks=32,
    num_gpu_blocks=256,
    num_cpu_blocks=64,
    iters=20,
    warmup=3,
    rtol=1e-4,
)


class Batch:
    """Sequences laid out on consecutive blocks, and the driver's copy of their K/V."""

    def __init__(
        self, setup: Setup, first_block: int, num_seqs: int, cached: int, new: int, seed: int
    ) -> None:
        layout = setup.layout
        gen = torch.Generator().manual_seed(seed)
        dtype = torch_dtype(layout)
        self.seq_len = cached + new
        blocks_per_seq = layout.num_blocks_for(self.seq_len)
        self.tables = [
            list(range(first_block + i * blocks_per_seq, first_block + (i + 1) * blocks_per_seq))
            for i in range(num_seqs)
        ]
        self.end_block = first_block + num_seqs * blocks_per_seq
        kv_shape = (num_seqs, self.seq_len, layout.num_kv_heads, layout.head_dim)
        self.k = torch.randn(kv_shape, generator=gen).to(dtype)
        self.v = torch.randn(kv_shape, generator=gen).to(dtype)
        q_shape = (num_seqs * new, setup.num_q_heads, layout.head_dim)
        self.q = torch.randn(q_shape, generator=gen).to(dtype)
        self.cached, self.new = cached, new
        bs = layout.block_size
        self.slots = torch.tensor(
            [[t[p // bs] * bs + p % bs for p in range(self.seq_len)] for t in self.tables]
        )
        self.plan = AttendPlan(
            block_tables=self.tables, seq_lens=[self.seq_len] * num_seqs, q_lens=[new] * num_seqs
        )

    def part(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, k, v) of positions [start, end) of every sequence, flattened."""
        shape = (-1, *self.k.shape[2:])
        return (
            self.slots[:, start:end].reshape(-1),
            self.k[:, start:end].reshape(shape),
            self.v[:, start:end].reshape(shape),
        )

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.part(0, self.cached)

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self.part(self.cached, self.seq_len)
        return k, v


def reference(setup: Setup, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' torch reference on a driver-side cache holding only this batch."""
    layout = setup.layout
    shape = (batch.end_block, layout.block_size, layout.num_kv_heads, layout.head_dim)
    k_cache = torch.zeros(shape, dtype=batch.k.dtype)
    v_cache = torch.zeros(shape, dtype=batch.k.dtype)
    slots, k, v = batch.part(0, batch.seq_len)
    kernels.write_kv_ref(k_cache, v_cache, k, v, slots)
    tables = torch.tensor(batch.tables, dtype=torch.int32)
    num_seqs = len(batch.tables)
    seq_lens = torch.full((num_seqs,), batch.seq_len, dtype=torch.int32)
    if batch.new == 1:
        return kernels.paged_decode_ref(
            batch.q, k_cache, v_cache, tables, seq_lens, return_lse=True
        )  # type: ignore[return-value]
    cu = torch.arange(0, (num_seqs + 1) * batch.new, batch.new, dtype=torch.int32)
    return kernels.paged_extend_ref(
        batch.q, k_cache, v_cache, tables, cu, seq_lens, return_lse=True
    )  # type: ignore[return-value]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest value: attention outputs average many values
    and are small, so an absolute tolerance would pass almost anything."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def run_checks(ray: Any, actor: Any, setup: Setup, decode: Batch, extend: Batch) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for name, batch in (("decode", decode), ("extend", extend)):
        ray.get(actor.write_kv.remote(0, *batch.prefix()))
        out, lse = ray.get(
            actor.attend.remote(0, batch.plan, batch.q, *batch.new_kv(), return_lse=True)
        )
        want_out, want_lse = reference(setup, batch)
        errs = {"out_rel_err": rel_err(out, want_out), "lse_rel_err": rel_err(lse, want_lse)}
        checks[name] = {**errs, "ok": max(errs.values()) <= setup.rtol}

    # copy-on-write: the last blocks of the decode sequences into free blocks
    free = max(decode.end_block, extend.end_block)
    src = list(range(setup.cow_blocks))  # blocks of the first decode sequences
    pairs = list(zip(src, range(free, free + len(src)), strict=True))
    ray.get(actor.copy_blocks.remote(pairs))
    copies = ray.get(actor.export_blocks.remote(Tier.GPU, [d for _, d in pairs]))
    sources = ray.get(actor.export_blocks.remote(Tier.GPU, src))
    checks["copy_blocks"] = {"ok": bool(torch.equal(copies, sources))}

    # swap round trip: device blocks -> host tier -> other device blocks
    n = min(setup.swap_blocks, 64)  # every block crosses Ray three times to be compared
    original = ray.get(actor.export_blocks.remote(Tier.GPU, list(range(n))))
    ray.get(actor.swap_out.remote([(b, b) for b in range(n)]))
    back = free + setup.cow_blocks
    ray.get(actor.swap_in.remote([(b, back + b) for b in range(n)]))
    returned = ray.get(actor.export_blocks.remote(Tier.GPU, list(range(back, back + n))))
    host = ray.get(actor.export_blocks.remote(Tier.CPU, list(range(n))))
    checks["swap_round_trip"] = {
        "ok": bool(torch.equal(returned, original) and torch.equal(host, original))
    }
    return checks


def payload_bytes(*values: Any) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def time_op(
    ray: Any, actor: Any, name: str, method: str, args: tuple, kwargs: dict, setup: Setup
) -> dict[str, Any]:
    def once() -> tuple[float, Any]:
        start = time.perf_counter()
        result = ray.get(getattr(actor, method).remote(*args, **kwargs))
        return time.perf_counter() - start, result

    for _ in range(setup.warmup):
        once()
    before = ray.get(actor.stats.remote())
    round_trips = []
    result = None
    for _ in range(setup.iters):
        seconds, result = once()
        round_trips.append(seconds)
    ray.get(actor.synchronize.remote())
    after = ray.get(actor.stats.remote())

    def delta(section: str, key: str | None) -> float:
        keys = [key] if key else list(after[section])
        total = 0.0
        for k in keys:
            total += after[section].get(k, {}).get("seconds", 0.0)
            total -= before[section].get(k, {}).get("seconds", 0.0)
        return total

    calls = setup.iters
    actor_us = statistics.mean(round_trips) * 1e6
    method_us = delta("call_time", method) / calls * 1e6
    kernel_us = delta("kernel_time", None) / calls * 1e6
    outputs = result if isinstance(result, tuple) else (result,)
    return {
        "op": name,
        "calls": calls,
        "actor_call_us": actor_us,
        "actor_call_p50_us": statistics.median(round_trips) * 1e6,
        "in_worker_us": method_us,
        "kernel_us": kernel_us,
        "overhead_us": actor_us - method_us,
        "overhead_per_kernel_ratio": (actor_us - method_us) / kernel_us if kernel_us else None,
        "payload_bytes": payload_bytes(*args, *kwargs.values(), *outputs),
    }


def run_timings(
    ray: Any, actor: Any, setup: Setup, decode: Batch, extend: Batch
) -> list[dict[str, Any]]:
    free = max(decode.end_block, extend.end_block)
    step_slots, step_k, step_v = decode.part(decode.cached, decode.seq_len)
    cow = list(zip(range(setup.cow_blocks), range(free, free + setup.cow_blocks), strict=True))
    swap = [(b, b) for b in range(setup.swap_blocks)]
    ops: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
        ("info", "info", (), {}),
        ("write_kv (decode step)", "write_kv", (0, step_slots, step_k, step_v), {}),
        ("attend decode + write", "attend", (0, decode.plan, decode.q, step_k, step_v), {}),
        ("attend extend + write", "attend", (0, extend.plan, extend.q, *extend.new_kv()), {}),
        ("copy_blocks", "copy_blocks", (cow,), {}),
        ("swap_out", "swap_out", (swap,), {}),
        ("swap_in", "swap_in", (swap,), {}),
    ]
    return [time_op(ray, actor, *op, setup) for op in ops]


def versions() -> dict[str, str]:
    import ray
    import triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ray": ray.__version__,
        "cuda": str(torch.version.cuda),
    }


def init_ray_for_checkout(namespace: str, **options: Any) -> int:
    """Start a local Ray whose worker processes import this checkout; returns the GPU count.

    ``env_vars`` and the other ``options`` go to ``ray.init`` (``env_vars`` into its
    runtime_env). Does nothing but count GPUs when Ray is already up.
    """
    import ray

    num_gpus = torch.cuda.device_count()
    if not ray.is_initialized():
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        runtime_env: dict[str, Any] = {
            "worker_process_setup_hook": "benchmarks.worker.install_checkout_finder"
        }
        env_vars = options.pop("env_vars", None)
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)
        ray.init(
            num_gpus=num_gpus,
            include_dashboard=False,
            namespace=namespace,
            runtime_env=runtime_env,
            **options,
        )
    return num_gpus


def run(setup: Setup, num_workers: int | None) -> dict[str, Any]:
    import ray

    num_gpus = init_ray_for_checkout(NAMESPACE)
    use_gpu = num_gpus > 0
    count = num_workers or max(num_gpus, 1)
    started = time.perf_counter()
    group = start_worker_actors(
        setup.layout,
        count,
        use_gpu=use_gpu,
        namespace=NAMESPACE,
        detached=False,
        max_restarts=0,
        num_gpu_blocks=setup.num_gpu_blocks,
        num_cpu_blocks=setup.num_cpu_blocks,
    )
    startup_s = time.perf_counter() - started
    decode = Batch(setup, 0, setup.decode_batch, setup.decode_context, 1, seed=1)
    extend = Batch(
        setup, decode.end_block, setup.extend_batch, setup.extend_cached, setup.extend_new, seed=2
    )
    results = []
    try:
        for worker_id, actor in group.actors.items():
            info = ray.get(actor.info.remote())
            checks = run_checks(ray, actor, setup, decode, extend)
            ops = run_timings(ray, actor, setup, decode, extend)
            stats = ray.get(actor.stats.remote())
            results.append(
                {
                    "worker_id": worker_id,
                    "device": info.device,
                    "checks": checks,
                    "ops": ops,
                    "bytes_swapped": stats["bytes_swapped"],
                }
            )
    finally:
        stop_worker_actors(group)
    card = torch.cuda.get_device_name(0) if use_gpu else platform.processor() or "cpu"
    return {
        "benchmark": "worker",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "card": card,
        "gpus": num_gpus,
        "host": platform.node(),
        "versions": versions(),
        "setup": {**asdict(setup), "layout": setup.layout.key()},
        "block_bytes": setup.layout.block_bytes,
        "startup_s": startup_s,
        "zero_copy_tensors": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "0") == "1",
        "ok": all(c["ok"] for r in results for c in r["checks"].values()),
        "workers": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"worker actors on {report['card']} ({report['setup']['layout']}), "
        f"started in {report['startup_s']:.1f}s, zero-copy tensors "
        f"{'on' if report['zero_copy_tensors'] else 'off'}; "
        f"checks {'ok' if report['ok'] else 'FAILED'}"
    ]
    for worker in report["workers"]:
        failed = [name for name, c in worker["checks"].items() if not c["ok"]]
        lines.append(
            f"worker {worker['worker_id']} on {worker['device']}: "
            + (f"FAILED {failed}" if failed else "all checks ok")
        )
        lines.append(
            f"  {'op':<24}{'round trip us':>14}{'in worker us':>14}{'kernel us':>12}"
            f"{'overhead us':>13}{'payload KiB':>13}"
        )
        for op in worker["ops"]:
            lines.append(
                f"  {op['op']:<24}{op['actor_call_us']:>14.0f}{op['in_worker_us']:>14.0f}"
                f"{op['kernel_us']:>12.0f}{op['overhead_us']:>13.0f}"
                f"{op['payload_bytes'] / 1024:>13.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--small", action="store_true", help="the small CPU shape even on a GPU")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per operation")
    parser.add_argument("--workers", type=int, default=None, help="default: one per GPU, or 1")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--zero-copy-tensors",
        action="store_true",
        help="set RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (Ray passes CPU tensors as read-only "
        "views of its object store instead of pickled copies; the worker only reads its inputs)",
    )
    args = parser.parse_args(argv)
    if args.zero_copy_tensors:
        if "ray" in sys.modules:
            parser.error("--zero-copy-tensors must be set before Ray is imported")
        os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
    setup = SMALL_SETUP if args.small or not torch.cuda.is_available() else GPU_SETUP
    if args.iters:
        setup = dataclasses.replace(setup, iters=args.iters)
    report = run(setup, args.workers)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if args.json else table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
