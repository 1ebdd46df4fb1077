"""Paged attention, KV write and block copy on a GPU, against same-run baselines.

    python -m benchmarks.attention [--json] [--out FILE] [--quick]

Decode (Hq=32, Hkv=8, D=128, bf16, page 16) is timed against torch SDPA (flash) on the
same KV laid out contiguously per sequence, GQA folded into the query length (no KV
expansion), and against gather-pages-then-SDPA. Extend (8 sequences x 2,048 new tokens
over a 2,048-token cached prefix) against SDPA flash with a bottom-right causal mask. The
KV write of 256 decode tokens and a copy-on-write of 256 blocks use the 8B-Llama pool
shape (32 layers). The bandwidth ceiling is a device-to-device copy of the same run
(bytes read + written). Times are ``triton.testing.do_bench`` medians (it flushes L2
between calls; every working set here is larger than L2 anyway), inputs are random.
A small sweep of split counts and tile settings is timed too, so the defaults can be
checked against the best found. Prints a table; ``--json`` also prints the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
from kvservice.kernels import copy_blocks, paged_decode, paged_extend, write_kv
from kvservice.kernels.decode import decode_config, launch_decode
from kvservice.kernels.extend import extend_config, launch_extend
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_SHAPES = [(1, 32768), (16, 4096), (64, 1024), (64, 4096), (64, 16384), (256, 2048)]
EXTEND_SHAPE = (8, 2048, 2048)  # sequences, new tokens, cached tokens
LLAMA8B_LAYERS = 32


def time_us(fn: Callable[[], Any]) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(fn: Callable[[], Any]) -> float:
    """GPU time: median over replays of a CUDA graph of ``fn`` (no host launch overhead)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def try_time(fn: Callable[[], Any], timer: Callable[[Callable[[], Any]], float] = graph_us) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return timer(fn)
    except Exception as exc:  # a variant that does not compile or fit is recorded, not fatal
        print(f"  variant failed: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def back_to_back_us(fn: Callable[[], Any], calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def provenance() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "card": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def copy_ceiling_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src))
    return 2 * (1 << 30) / t / 1e3


def random_pool(num_blocks: int, num_layers: int) -> torch.Tensor:
    pool = torch.empty(num_blocks, num_layers, 2, BS, HKV, D, dtype=DTYPE, device="cuda")
    return pool.normal_()


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """[B, Hkv, L, D] contiguous copy of each sequence's pages."""
    batch = tables.shape[0]
    return cache[tables.long()].reshape(batch, -1, HKV, D)[:, :length].transpose(1, 2).contiguous()


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def decode_inputs(batch: int, length: int) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, seq_lens, out, lse): random pages, in random order,
    of a two-layer pool (so the layer views are strided like a real pool's)."""
    pages = length // BS
    num_blocks = batch * pages + 16
    pool = random_pool(num_blocks, 2)
    k_cache, v_cache = pool[:, 0, 0], pool[:, 0, 1]
    tables = torch.randperm(num_blocks, device="cuda")[: batch * pages].view(batch, pages).int()
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda").to(DTYPE)
    out = torch.empty_like(q)
    lse = torch.empty(batch, HQ, dtype=torch.float32, device="cuda")
    return q, k_cache, v_cache, tables, lens, out, lse


def bench_decode(batch: int, length: int, ceiling: float, quick: bool) -> dict[str, Any]:
    group = HQ // HKV
    q, k_cache, v_cache, tables, lens, out, lse = decode_inputs(batch, length)
    scale = 1 / math.sqrt(D)
    kv_bytes = 2 * batch * length * HKV * D * 2

    def ours() -> torch.Tensor:
        return paged_decode(q, k_cache, v_cache, tables, lens, check_indices=False)

    k_contig = contiguous_kv(k_cache, tables, length)
    v_contig = contiguous_kv(v_cache, tables, length)
    q_folded = q.view(batch, HKV, group, D)

    def sdpa() -> torch.Tensor:
        return sdpa_flash(q_folded, k_contig, v_contig, scale=scale)

    def gather_sdpa() -> torch.Tensor:
        idx = tables.long()
        k = k_cache[idx].view(batch, length, HKV, D).transpose(1, 2)
        v = v_cache[idx].view(batch, length, HKV, D).transpose(1, 2)
        return sdpa_flash(q_folded, k, v, scale=scale)

    reference = sdpa().reshape(batch, HQ, D)
    err = rel_err(ours(), reference)
    row: dict[str, Any] = {"B": batch, "L": length, "kv_mib": kv_bytes / 2**20}
    # GPU time (graph replays) is the comparison; eager calls add host launch overhead.
    row["ours_us"] = graph_us(ours)
    row["sdpa_us"] = graph_us(sdpa)
    row["gather_sdpa_us"] = try_time(gather_sdpa)
    row["ours_eager_us"] = time_us(ours)
    row["sdpa_eager_us"] = time_us(sdpa)
    row["ours_over_sdpa"] = row["ours_us"] / row["sdpa_us"]
    row["ours_gbps"] = kv_bytes / row["ours_us"] / 1e3
    row["sdpa_gbps"] = kv_bytes / row["sdpa_us"] / 1e3
    row["ours_ceiling_pct"] = 100 * row["ours_gbps"] / ceiling
    row["sdpa_ceiling_pct"] = 100 * row["sdpa_gbps"] / ceiling
    row["rel_err_vs_sdpa"] = err

    # Sweep: tile settings at the default split count, then split counts at the best tiles.
    sweep: list[dict[str, Any]] = []
    row["auto_splits"] = launch_decode(q, k_cache, v_cache, tables, lens, out, lse, scale)
    # Back-to-back calls: per-call wall time, max(host launch cost, GPU time).
    row["ours_back_to_back_us"] = back_to_back_us(ours)
    row["launch_only_back_to_back_us"] = back_to_back_us(
        lambda: launch_decode(q, k_cache, v_cache, tables, lens, out, lse, scale))
    row["sdpa_back_to_back_us"] = back_to_back_us(sdpa)
    best_cfg, best_t = decode_config(D, 2, row["auto_splits"]), row["ours_us"]
    configs = [] if quick else [
        {"block_n": 32, "num_warps": 4, "num_stages": 3},
        {"block_n": 64, "num_warps": 4, "num_stages": 4},
        {"block_n": 128, "num_warps": 4, "num_stages": 2},
        {"block_n": 64, "num_warps": 8, "num_stages": 3},
        {"block_n": 16, "num_warps": 2, "num_stages": 4},
    ]
    for cfg in configs:
        t = try_time(lambda cfg=cfg: launch_decode(
            q, k_cache, v_cache, tables, lens, out, lse, scale, None, cfg))
        sweep.append({**cfg, "splits": "auto", "us": t})
        if t is not None and t < best_t:
            best_cfg, best_t = cfg, t
    splits_tried = [] if quick else [1, 2, 3, 4, 6, 8, 16, 32, 64, 128]
    for splits in splits_tried:
        if splits > 1 and length // splits < 128:
            continue
        t = try_time(lambda s=splits: launch_decode(
            q, k_cache, v_cache, tables, lens, out, lse, scale, s, best_cfg))
        sweep.append({**best_cfg, "splits": splits, "us": t})
    timed = [s for s in sweep if s["us"] is not None]
    if timed:
        best = min(timed, key=lambda s: s["us"])
        row["best_sweep_us"] = best["us"]
        row["best_sweep"] = best
    row["sweep"] = sweep
    return row


def bench_extend(quick: bool) -> dict[str, Any]:
    num_seqs, q_len, cached = EXTEND_SHAPE
    length = q_len + cached
    pages = length // BS
    num_blocks = num_seqs * pages + 16
    pool = random_pool(num_blocks, 2)
    k_cache, v_cache = pool[:, 0, 0], pool[:, 0, 1]
    tables = torch.randperm(num_blocks, device="cuda")[: num_seqs * pages].view(num_seqs, pages).int()
    lens = torch.full((num_seqs,), length, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs * q_len, HQ, D, device="cuda").to(DTYPE)
    scale = 1 / math.sqrt(D)
    pairs = num_seqs * (q_len * cached + q_len * (q_len + 1) // 2)
    flops = 4 * pairs * HQ * D

    def ours() -> torch.Tensor:
        return paged_extend(q, k_cache, v_cache, tables, cu, lens, check_indices=False)

    k_contig = contiguous_kv(k_cache, tables, length)
    v_contig = contiguous_kv(v_cache, tables, length)
    q4 = q.view(num_seqs, q_len, HQ, D).transpose(1, 2).contiguous()
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q_len, length)
    baseline = "sdpa_flash_gqa"

    def sdpa() -> torch.Tensor:
        return sdpa_flash(q4, k_contig, v_contig, attn_mask=mask, scale=scale, enable_gqa=True)

    try:
        reference = sdpa()
    except Exception as exc:
        print(f"  flash with enable_gqa failed ({exc!s:.120}); expanding KV", file=sys.stderr)
        baseline = "sdpa_flash_expanded_kv"
        k_contig = k_contig.repeat_interleave(HQ // HKV, dim=1)
        v_contig = v_contig.repeat_interleave(HQ // HKV, dim=1)

        def sdpa() -> torch.Tensor:
            return sdpa_flash(q4, k_contig, v_contig, attn_mask=mask, scale=scale)

        reference = sdpa()
    reference = reference.transpose(1, 2).reshape(num_seqs * q_len, HQ, D)
    row: dict[str, Any] = {"seqs": num_seqs, "q_len": q_len, "cached": cached, "baseline": baseline}
    row["rel_err_vs_sdpa"] = rel_err(ours(), reference)
    row["ours_us"] = graph_us(ours)
    row["sdpa_us"] = graph_us(sdpa)
    row["ours_eager_us"] = time_us(ours)
    row["sdpa_eager_us"] = time_us(sdpa)
    row["ours_tflops"] = flops / row["ours_us"] / 1e6
    row["sdpa_tflops"] = flops / row["sdpa_us"] / 1e6
    row["ours_over_sdpa_throughput"] = row["sdpa_us"] / row["ours_us"]

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], HQ, dtype=torch.float32, device="cuda")
    sweep = []
    configs = [] if quick else [
        {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
        {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2},
        {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 3},
        {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 2},
        {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
        {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 4},
    ]
    for cfg in configs:
        t = try_time(lambda cfg=cfg: launch_extend(
            q, k_cache, v_cache, tables, cu, lens, out, lse, scale, None, cfg))
        sweep.append({**cfg, "us": t, "tflops": flops / t / 1e6 if t else None})
    row["default_config"] = extend_config(D, 2)
    row["sweep"] = sweep
    return row


def bench_write_and_copy(ceiling: float) -> dict[str, Any]:
    num_blocks, tokens = 4096, 256
    pool = random_pool(num_blocks, LLAMA8B_LAYERS)
    k_cache, v_cache = pool[:, 0, 0], pool[:, 0, 1]
    k = torch.randn(tokens, HKV, D, device="cuda").to(DTYPE)
    v = torch.randn(tokens, HKV, D, device="cuda").to(DTYPE)
    slots = torch.randperm(num_blocks * BS, device="cuda")[:tokens]

    def write() -> None:
        write_kv(k_cache, v_cache, k, v, slots, check_indices=False)

    write()
    blocks, offsets = slots // BS, slots % BS
    ok = torch.equal(k_cache[blocks, offsets], k) and torch.equal(v_cache[blocks, offsets], v)
    row: dict[str, Any] = {"tokens": tokens, "layers": LLAMA8B_LAYERS, "correct": ok}
    row["write_kv_us"] = time_us(write)
    row["write_kv_graph_us"] = triton.testing.do_bench_cudagraph(write, rep=100) * 1e3

    def torch_write() -> None:
        k_cache[blocks, offsets] = k
        v_cache[blocks, offsets] = v

    row["torch_index_put_us"] = time_us(torch_write)

    num_pairs = 256
    perm = torch.randperm(num_blocks, device="cuda")
    pairs = torch.stack([perm[:num_pairs], perm[num_pairs : 2 * num_pairs]], dim=1)
    copy_bytes = 2 * num_pairs * pool[0].numel() * pool.element_size()

    def cow() -> None:
        copy_blocks(pool, pairs, check_indices=False)

    def torch_cow() -> None:
        pool[pairs[:, 1]] = pool[pairs[:, 0]]

    cow()
    ok = torch.equal(pool[pairs[:, 1]], pool[pairs[:, 0]])
    row["copy_pairs"] = num_pairs
    row["copy_correct"] = ok
    row["copy_blocks_us"] = time_us(cow)
    row["torch_copy_us"] = time_us(torch_cow)
    row["copy_blocks_gbps"] = copy_bytes / row["copy_blocks_us"] / 1e3
    row["copy_ceiling_pct"] = 100 * row["copy_blocks_gbps"] / ceiling
    return row


def decode_host_costs(batch: int, length: int) -> dict[str, float]:
    q, k_cache, v_cache, tables, lens, out, lse = decode_inputs(batch, length)

    def public() -> torch.Tensor:
        return paged_decode(q, k_cache, v_cache, tables, lens, check_indices=False)

    def launch_only() -> int:
        return launch_decode(q, k_cache, v_cache, tables, lens, out, lse, 0.088)

    key = f"decode_B{batch}_L{length}"
    return {
        key + "_gpu_us": graph_us(public),
        key + "_public_us": back_to_back_us(public),
        key + "_launch_only_us": back_to_back_us(launch_only),
    }


def host_costs() -> dict[str, Any]:
    """Per-call wall time of back-to-back calls whose GPU work is short, so host cost shows."""
    rows: dict[str, Any] = {}
    for batch, length in ((1, 32768), (16, 4096)):
        rows.update(decode_host_costs(batch, length))
    pool = random_pool(1024, 4)
    k_cache, v_cache = pool[:, 0, 0], pool[:, 0, 1]
    k = torch.randn(256, HKV, D, device="cuda").to(DTYPE)
    slots = torch.randperm(1024 * BS, device="cuda")[:256]
    rows["write_kv_public_us"] = back_to_back_us(
        lambda: write_kv(k_cache, v_cache, k, k, slots, check_indices=False))
    x = torch.empty(1, device="cuda")
    rows["torch_add_us"] = back_to_back_us(lambda: x.add_(1))
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        f"card {result['card']}, torch {result['torch']}, triton {result['triton']}, "
        f"copy ceiling {result['ceiling_gbps']:.0f} GB/s",
        "",
        "GPU time from CUDA-graph replays; eager = one Python call each (host overhead included).",
        "",
        "| decode B x L | ours us | SDPA flash us | gather+SDPA us | ours/SDPA | ours GB/s (% ceil) "
        "| SDPA % ceil | eager ours / SDPA us | back-to-back ours / SDPA us | splits | best sweep us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["decode"]:
        gather = f"{r['gather_sdpa_us']:.1f}" if r.get("gather_sdpa_us") else "-"
        best = f"{r['best_sweep_us']:.1f}" if r.get("best_sweep_us") else "-"
        lines.append(
            f"| {r['B']} x {r['L']} | {r['ours_us']:.1f} | {r['sdpa_us']:.1f} | {gather} | "
            f"{r['ours_over_sdpa']:.2f} | {r['ours_gbps']:.0f} ({r['ours_ceiling_pct']:.0f}%) | "
            f"{r['sdpa_ceiling_pct']:.0f}% | {r['ours_eager_us']:.0f} / {r['sdpa_eager_us']:.0f} | "
            f"{r['ours_back_to_back_us']:.0f} / {r['sdpa_back_to_back_us']:.0f} | "
            f"{r['auto_splits']} | {best} |"
        )
    e = result["extend"]
    lines += [
        "",
        f"extend {e['seqs']} x {e['q_len']} new over {e['cached']} cached: ours {e['ours_us']:.0f} us "
        f"({e['ours_tflops']:.0f} TFLOP/s), SDPA {e['sdpa_us']:.0f} us ({e['sdpa_tflops']:.0f} TFLOP/s, "
        f"{e['baseline']}), throughput ratio {e['ours_over_sdpa_throughput']:.2f}; eager "
        f"{e['ours_eager_us']:.0f} / {e['sdpa_eager_us']:.0f} us",
    ]
    best = [s for s in e["sweep"] if s["us"]]
    if best:
        b = min(best, key=lambda s: s["us"])
        lines.append(f"  best extend sweep: {b}")
    w = result["write_copy"]
    lines += [
        f"write_kv 256 tokens: {w['write_kv_us']:.1f} us (graph {w['write_kv_graph_us']:.1f} us), "
        f"torch index_put {w['torch_index_put_us']:.1f} us, correct={w['correct']}",
        f"copy_blocks 256 x 2 MiB: {w['copy_blocks_us']:.0f} us = {w['copy_blocks_gbps']:.0f} GB/s "
        f"({w['copy_ceiling_pct']:.0f}% of ceiling), torch {w['torch_copy_us']:.0f} us, "
        f"correct={w['copy_correct']}",
    ]
    return "\n".join(lines)


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the JSON result")
    parser.add_argument("--out", help="write the JSON result to this file")
    parser.add_argument("--quick", action="store_true", help="skip the tuning sweeps")
    parser.add_argument("--host-only", action="store_true", help="only the host launch costs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.attention needs a CUDA GPU")
    torch.manual_seed(0)
    if args.host_only:
        host = {"benchmark": "attention_host", **provenance(), **host_costs()}
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(host, indent=2) + "\n")
        for key, value in host.items():
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
        return
    result: dict[str, Any] = {"benchmark": "attention", **provenance()}
    result["ceiling_gbps"] = copy_ceiling_gbps()
    result["decode"] = []
    for batch, length in DECODE_SHAPES:
        print(f"decode B={batch} L={length}", file=sys.stderr)
        result["decode"].append(bench_decode(batch, length, result["ceiling_gbps"], args.quick))
        release()
    print("extend", file=sys.stderr)
    result["extend"] = bench_extend(args.quick)
    release()
    print("write/copy", file=sys.stderr)
    result["write_copy"] = bench_write_and_copy(result["ceiling_gbps"])
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    print(table(result))


if __name__ == "__main__":
    main()
