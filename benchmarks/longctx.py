"""Long-context decode: attention over a sequence whose cold pages stay in the CPU tier.

    python -m benchmarks.longctx [--json] [--out FILE] [--small] [--repeats N]

1. long: one sequence of 262,144 tokens, 8B-Llama KV shape (32 layers, 8 KV heads, d=128,
   bf16, page 16), on one Worker whose GPU tier holds 65,536 tokens: the first pages
   (attention sinks) and the most recent ones are hot, the 196,608 tokens between them are
   cold (pinned CPU tier). Per-layer decode attention (``Worker.attend``, host work
   included, synchronized, median over the layers of a step, which share one plan object:
   it is split once, on the first, reported apart) against the floor set by moving the cold
   bytes at the pinned host-to-device bandwidth measured in this run (one contiguous
   copy). Target: within 1.25x of the floor. Run per staging copy mode (gather kernel,
   copy-engine 2-D copies, auto) and with scattered CPU pages (auto). The output is
   checked against the fp32 reference over the gathered K/V.
2. fits: a 32,768-token sequence entirely in the GPU tier: ``Worker.attend`` with a plan
   naming every block's tier (all GPU) against the same call without tiers, in wall time
   (do_bench) and device time (CUDA profiler); target: tiers add <= 5%. The bare decode
   kernel is timed too, for scale (the worker's own checks and uploads are not tiering),
   and the all-GPU plan forced through the two-part engine (what the plain path avoids).

One GPU, no Ray. ``--small``: a scaled-down shape (on the CPU when there is no GPU) to
check the script end to end; the targets are for the full shape on a GPU.
Prints a table; ``--json`` also prints the JSON; ``--out`` writes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from kvservice.kernels import paged_decode, paged_decode_ref
from kvservice.workers import AttendPlan, Worker

from kvservice.core.layout import Layout

LONG_TARGET = 1.25  # per-layer time / copy floor
FITS_TARGET = 0.05  # overhead


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int
    dtype: str
    block_size: int
    long_tokens: int
    gpu_tokens: int
    sink_blocks: int
    fits_tokens: int


FULL = Shape(32, 8, 128, 32, "bfloat16", 16, 262_144, 65_536, 4, 32_768)
SMALL = Shape(4, 2, 64, 8, "bfloat16", 16, 8_192, 2_048, 1, 2_048)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[int], Any], device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls (fn(i) for call i), each synchronized."""
    times = []
    for i in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn(i)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_us(fn: Callable[[], Any], device: torch.device) -> float:
    """Median time of ``fn``: do_bench (events, L2 flushed) on a GPU, wall on the CPU."""
    if device.type == "cuda":
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return 1e3 * statistics.median(wall_ms(lambda _: fn(), device, 20))


def fill_random(pool: torch.Tensor, device: torch.device, seed: int) -> None:
    """Random values (never zeros), made on the device in pieces of about 1 GiB."""
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = pool.view(-1)
    step = max(1, (1 << 30) // pool.element_size())
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        piece.copy_(torch.randn(piece.shape, generator=gen, device=device, dtype=pool.dtype))
    sync(device)


def copy_bandwidth_gbps(src: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Host-to-device bandwidth of one contiguous copy of ``src`` (pinned on a GPU run;
    on the CPU, a plain memory copy), median of ``repeats`` after a warm-up."""
    dst = torch.empty(src.shape, dtype=src.dtype, device=device)
    dst.copy_(src, non_blocking=True)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = wall_ms(lambda _: dst.copy_(src), device, repeats)
    return src.numel() * src.element_size() / statistics.median(times) / 1e6


def kernel_totals(worker: Worker) -> dict[str, float]:
    return {k: v["seconds"] for k, v in worker.stats()["kernel_time"].items()}


def delta(after: dict[str, float], before: dict[str, float], key: str, calls: int) -> float:
    """Device ms per call of one kernel-timer region between two readings."""
    return 1e3 * (after.get(key, 0.0) - before.get(key, 0.0)) / max(calls, 1)


def long_plan(shape: Shape, scatter: bool, seed: int) -> tuple[AttendPlan, torch.Tensor]:
    """Sinks and the recent window hot, the middle cold; returns (plan, cpu ids in order)."""
    bs = shape.block_size
    num_blocks = shape.long_tokens // bs
    num_hot = shape.gpu_tokens // bs
    num_cold = num_blocks - num_hot
    cpu_ids = torch.arange(num_cold)
    if scatter:
        cpu_ids = torch.randperm(num_cold, generator=torch.Generator().manual_seed(seed))
    sinks = torch.arange(shape.sink_blocks)
    recent = torch.arange(shape.sink_blocks, num_hot)
    table = tuple(torch.cat([sinks, cpu_ids, recent]).tolist())
    tiers = (0,) * len(sinks) + (1,) * num_cold + (0,) * len(recent)
    # Tuples: a frozen plan, split once and reused by every layer of a step.
    return AttendPlan((table,), (shape.long_tokens,), (1,), None, (tiers,)), cpu_ids


def gathered_reference(
    worker: Worker, shape: Shape, cpu_ids: torch.Tensor, q: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention over the sequence's K/V gathered in order from both tiers."""
    bs = shape.block_size
    num_hot = shape.gpu_tokens // bs
    gpu = worker.gpu_pool[:, layer]
    cold = worker.cpu_pool[cpu_ids, layer].to(worker.device)
    blocks = torch.cat([gpu[: shape.sink_blocks], cold, gpu[shape.sink_blocks : num_hot]])
    table = torch.arange(blocks.shape[0], dtype=torch.int32, device=worker.device)[None, :]
    lens = torch.tensor([shape.long_tokens], dtype=torch.int32, device=worker.device)
    out, lse = paged_decode_ref(q, blocks[:, 0], blocks[:, 1], table, lens, return_lse=True)
    return out, lse


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench_long(
    worker: Worker, shape: Shape, q: torch.Tensor, floor_ms: float, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    device = worker.device
    cases = [("kernel", False), ("memcpy2d", False), ("auto", False), ("auto", True)]
    if device.type != "cuda":
        cases = [("kernel", False), ("kernel", True)]
    for mode, scatter in cases:
        row: dict[str, Any] = {"copy_mode": mode, "scattered_cpu_pages": scatter}
        try:
            plan, cpu_ids = long_plan(shape, scatter, seed=1)
            worker.tiered.copy_mode = mode
            sync(device)
            start = time.perf_counter()
            out, lse = worker.attend(0, plan, q, return_lse=True)  # first call: splits the plan
            sync(device)
            row["first_call_ms"] = (time.perf_counter() - start) * 1e3
            want_out, want_lse = gathered_reference(worker, shape, cpu_ids, q, 0)
            row["rel_err_out"] = rel_err(out, want_out)
            row["max_abs_err_lse"] = float((lse - want_lse).abs().max())
            row["correct"] = row["rel_err_out"] < 2e-2 and row["max_abs_err_lse"] < 1e-2
            before = kernel_totals(worker)
            stats_before = worker.tiered.stats()

            def decode(i: int, plan: AttendPlan = plan) -> Any:
                return worker.attend(i % shape.num_layers, plan, q)

            times = wall_ms(decode, device, repeats)
            after = kernel_totals(worker)
            stats_after = worker.tiered.stats()
            ms = statistics.median(times)
            row.update(
                per_layer_ms=ms,
                per_layer_ms_min=min(times),
                floor_ms=floor_ms,
                vs_floor=ms / floor_ms,
                stream_device_ms=delta(after, before, "tiered_stream", repeats),
                cold_attention_device_ms=delta(after, before, "tiered_cold_attention", repeats),
                hot_attention_device_ms=delta(after, before, "paged_decode", repeats),
                chunks_per_layer=sum(
                    stats_after.get(k, 0) - stats_before.get(k, 0)
                    for k in ("chunks_kernel", "chunks_memcpy2d")
                )
                / repeats,
                memcpy2d_chunks=stats_after.get("chunks_memcpy2d", 0)
                - stats_before.get("chunks_memcpy2d", 0),
            )
        except Exception as exc:  # unattended: record and go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=5)
        rows.append(row)
    return rows


def device_us(fn: Callable[[], Any], device: torch.device, calls: int = 20) -> float | None:
    """Device time per call: the kernels and copies ``fn`` queues, gaps between them
    excluded (the CUDA profiler); None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(device)
        total = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    except Exception:  # no profiler here: wall time only
        traceback.print_exc()
        return None
    return total / calls if total else None


def bench_fits(worker: Worker, shape: Shape, q: torch.Tensor) -> dict[str, Any]:
    """A sequence entirely in the GPU tier. What tiering adds is measured against the same
    call without tiers (the worker's own path), in wall time and in device time; the bare
    decode kernel is timed too, for scale (the worker's checks and uploads are not tiering).
    """
    device = worker.device
    num_blocks = shape.fits_tokens // shape.block_size
    ids = torch.randperm(shape.gpu_tokens // shape.block_size)[:num_blocks]
    # Frozen plans (tuples), as a decode step's layers share them: the worker keeps the
    # checked, uploaded plan, so what is left per call is what tiering could add to.
    plain = AttendPlan((tuple(ids.tolist()),), (shape.fits_tokens,), (1,))
    tiered = AttendPlan(
        plain.block_tables, plain.seq_lens, plain.q_lens, None, ((0,) * num_blocks,)
    )
    table = ids[None, :]
    layer = 1
    k_cache, v_cache = worker.gpu_pool[:, layer, 0], worker.gpu_pool[:, layer, 1]
    table_dev = table.to(torch.int32).to(device)
    lens_dev = torch.tensor([shape.fits_tokens], dtype=torch.int32, device=device)
    out: dict[str, Any] = {"tokens": shape.fits_tokens}

    def kernel() -> Any:
        return paged_decode(q, k_cache, v_cache, table_dev, lens_dev, check_indices=False)

    def with_tiers() -> Any:
        return worker.attend(layer, tiered, q)

    def without_tiers() -> Any:
        return worker.attend(layer, plain, q)

    def forced() -> Any:  # the same plan through the two-part engine, for scale
        return worker.tiered.attend(
            layer, tiered, q, None, None, scale=None, sliding_window=None, return_lse=False
        )

    try:
        out["rel_err"] = rel_err(with_tiers(), kernel())
        out["kernel_us"] = bench_us(kernel, device)
        out["worker_plain_plan_us"] = bench_us(without_tiers, device)
        out["worker_tiered_plan_us"] = bench_us(with_tiers, device)
        out["forced_engine_us"] = bench_us(forced, device)
        out["kernel_device_us"] = device_us(kernel, device)
        out["plain_plan_device_us"] = device_us(without_tiers, device)
        out["tiered_plan_device_us"] = device_us(with_tiers, device)
        out["overhead_vs_plain_plan"] = (
            out["worker_tiered_plan_us"] / out["worker_plain_plan_us"] - 1
        )
        if out["tiered_plan_device_us"] is not None:
            out["device_overhead_vs_plain_plan"] = (
                out["tiered_plan_device_us"] / out["plain_plan_device_us"] - 1
            )
            out["device_overhead_vs_kernel"] = (
                out["tiered_plan_device_us"] / out["kernel_device_us"] - 1
            )
    except Exception as exc:  # unattended: record and go on
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=5)
    return out


def run(shape: Shape, device: torch.device, repeats: int) -> dict[str, Any]:
    layout = Layout(
        shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype, shape.block_size
    )
    bs = shape.block_size
    num_hot = shape.gpu_tokens // bs
    num_cold = shape.long_tokens // bs - num_hot
    per_block = layout.block_bytes // layout.num_layers  # one layer's K and V of a page
    started = time.perf_counter()
    worker = Worker(0, layout, device=device, num_gpu_blocks=num_hot, num_cpu_blocks=num_cold)
    fill_random(worker.gpu_pool, device, seed=1)
    if device.type == "cuda":
        fill_random_host(worker.cpu_pool, device, seed=2)
    else:
        fill_random(worker.cpu_pool, device, seed=2)
    setup_s = time.perf_counter() - started
    gen = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(
        (1, shape.num_q_heads, shape.head_dim), generator=gen, device=device,
        dtype=DTYPES[shape.dtype],
    )  # fmt: skip
    cold_bytes = num_cold * per_block
    source = worker.cpu_pool.view(-1)[: cold_bytes // worker.cpu_pool.element_size()]
    bandwidth = copy_bandwidth_gbps(source, device, repeats=5)
    floor_ms = cold_bytes / bandwidth / 1e6
    result: dict[str, Any] = {
        "shape": asdict(shape),
        "setup_s": setup_s,
        "chunk_blocks": worker.tiered.chunk_blocks,
        "cold_bytes_per_layer": cold_bytes,
        "hot_bytes_per_layer": num_hot * per_block,
        "copy_bandwidth_gbps": bandwidth,
        "copy_pinned": bool(worker.cpu_pool.is_pinned()),
        "floor_ms": floor_ms,
        "long": bench_long(worker, shape, q, floor_ms, repeats),
        "fits": bench_fits(worker, shape, q),
    }
    best = [
        r["vs_floor"] for r in result["long"] if "vs_floor" in r and not r["scattered_cpu_pages"]
    ]
    fits = result["fits"]
    result["targets"] = {
        "long_vs_floor": min(best) if best else None,
        "long_ok": bool(best) and min(best) <= LONG_TARGET,
        "fits_overhead_vs_plain_plan": fits.get("overhead_vs_plain_plan"),
        "fits_device_overhead_vs_plain_plan": fits.get("device_overhead_vs_plain_plan"),
        "fits_ok": "error" not in fits
        and fits["overhead_vs_plain_plan"] <= FITS_TARGET
        and fits.get("device_overhead_vs_plain_plan", 0.0) <= FITS_TARGET,
        "correct": all(r.get("correct", False) for r in result["long"] if "error" not in r)
        and fits.get("rel_err", 1.0) < 2e-2,
    }
    return result


def fill_random_host(pool: torch.Tensor, device: torch.device, seed: int) -> None:
    """Random host pool: pieces made on the GPU and copied down (fast even for 24 GiB)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = pool.view(-1)
    step = (1 << 30) // pool.element_size()
    piece = torch.empty(step, dtype=pool.dtype, device=device)
    for start in range(0, flat.numel(), step):
        n = min(step, flat.numel() - start)
        piece[:n].normal_(generator=gen)
        flat[start : start + n].copy_(piece[:n])
    sync(device)


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "benchmark": "longctx",
        "card": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"longctx on {result['card']} ({result['device']}): "
        f"{result['shape']['long_tokens']} tokens, GPU tier {result['shape']['gpu_tokens']}, "
        f"cold {result['cold_bytes_per_layer'] / 2**20:.0f} MiB/layer, host->device "
        f"{result['copy_bandwidth_gbps']:.1f} GB/s (pinned={result['copy_pinned']}), "
        f"floor {result['floor_ms']:.2f} ms/layer",
        "",
        "| copy mode | CPU pages | ms/layer | x floor | stream ms | cold attn ms | hot attn ms "
        "| chunks | rel err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["long"]:
        pages = "scattered" if r["scattered_cpu_pages"] else "in order"
        if "error" in r:
            lines.append(f"| {r['copy_mode']} | {pages} | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['copy_mode']} | {pages} | {r['per_layer_ms']:.2f} | {r['vs_floor']:.2f} "
            f"| {r['stream_device_ms']:.2f} | {r['cold_attention_device_ms']:.2f} "
            f"| {r['hot_attention_device_ms']:.3f} | {r['chunks_per_layer']:.0f} "
            f"| {r['rel_err_out']:.1e} |"
        )
    f = result["fits"]
    lines += ["", f"fits: {f['tokens']} tokens all in the GPU tier"]
    if "error" in f:
        lines.append(f"error: {f['error']}")
    else:
        lines += [
            "| | bare kernel | worker, plan without tiers | worker, plan with tiers (all GPU) "
            "| forced two-part engine |",
            "| --- | --- | --- | --- | --- |",
            f"| wall us | {f['kernel_us']:.1f} | {f['worker_plain_plan_us']:.1f} "
            f"| {f['worker_tiered_plan_us']:.1f} | {f['forced_engine_us']:.1f} |",
            f"| device us | {_us(f.get('kernel_device_us'))} | {_us(f.get('plain_plan_device_us'))} "
            f"| {_us(f.get('tiered_plan_device_us'))} | |",
        ]
    t = result["targets"]
    long_vs = "n/a" if t["long_vs_floor"] is None else f"{t['long_vs_floor']:.2f}x"
    lines += [
        "",
        f"targets: long {long_vs} of floor (<= {LONG_TARGET}x): "
        f"{'PASS' if t['long_ok'] else 'FAIL'}; fits: tiers add "
        f"{_pct(t['fits_overhead_vs_plain_plan'])} wall, "
        f"{_pct(t['fits_device_overhead_vs_plain_plan'])} device (<= {FITS_TARGET:.0%}): "
        f"{'PASS' if t['fits_ok'] else 'FAIL'}; outputs correct: {t['correct']}",
    ]
    if result["shape"] != asdict(FULL) or result["device"] == "cpu":
        lines.append("(not the full shape on a GPU: the targets do not apply)")
    return "\n".join(lines)


def _us(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the JSON result")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--small", action="store_true", help="scaled-down shape (CPU check)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("no GPU: running the --small shape on the CPU", file=sys.stderr)
    shape = FULL if cuda and not args.small else SMALL
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    repeats = args.repeats or (2 * shape.num_layers if cuda else 4)
    result = {**provenance(device), **run(shape, device, repeats)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
