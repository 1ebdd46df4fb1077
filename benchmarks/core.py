"""Bookkeeping speed and memory efficiency of the paged core (pure Python, no memory pools).

    python -m benchmarks.core [--json] [--out FILE] [--requests N] [--seed S]

* decode_step_us: one decode step of 256 running sequences (1,024-token prompts, one new
  token each, 16-token blocks): ``prepare_decode`` (append, write slots, block tables) plus
  ``mark_computed`` for each. Also the same step through the per-sequence calls (append,
  prepare_write, then one prepare_attention). Median over 256 consecutive steps.
* prefix_lookup_32k_us: ``lookup_prefix`` of a 32,768-token prompt whose 2,048 blocks are
  all cached (every block hashed and its tokens compared). Median of 50.
* Trace: 2,000 ShareGPT-like requests. Prompt and output lengths are log-normal with the
  means the PagedAttention paper reports for ShareGPT (input 161.31, output 337.99 tokens)
  and sigma 1.0 (input) / 0.9 (output); prompts are clipped to [1, 2,047] and outputs to
  [1, 2,048 - prompt]. Both systems get the same KV budget (64 x 2,048 tokens) and run
  continuous batching, FIFO admission, one token per running request per step:
  contiguous reserves 2,048 tokens per request; paged is the KVCacheManager itself
  (16-token blocks, admission while it has room, recompute preemption of the newest
  request when a step does not fit). waste_pct_* is the share of reserved KV memory not
  holding a token, summed over all steps; max_concurrent_* the most requests running at
  once, mean_concurrent_saturated_* the mean while requests were still waiting.
* prefix_share_saving_pct: 64 requests = one shared 2,048-token system prompt + 100
  unique tokens each; KV blocks used with the prefix cache versus without.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kvservice.core.commands import CreateResult, OutOfMemory, PoolSizes
from kvservice.core.ids import Tier
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager

LAYOUT = Layout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
MAX_LEN = 2048
VOCAB = 32_000
SHAREGPT = {"input_mean": 161.31, "input_sigma": 1.0, "output_mean": 337.99, "output_sigma": 0.9}


def manager(num_gpu_blocks: int) -> KVCacheManager:
    # Watermarks at 1.0: the benchmark measures allocation itself, not early swapping.
    return KVCacheManager(
        LAYOUT, {0: PoolSizes(num_gpu_blocks, 0)}, high_watermark=1.0, low_watermark=1.0
    )


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, cpu) microseconds of one call; cpu time is the process's own, which other
    load on a shared machine inflates far less than wall time."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    fn()
    return (time.perf_counter_ns() - wall) / 1e3, (time.process_time_ns() - cpu) / 1e3


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def decode_step(rng: random.Random, batched: bool) -> tuple[float, float]:
    m = manager(256 * 96)
    seq_ids = []
    for _ in range(256):
        result = m.create(None, tokens(rng, 1024))
        assert isinstance(result, CreateResult)
        m.mark_computed(result.seq_id, 1024)
        seq_ids.append(result.seq_id)

    def batched_step(new: list[int]) -> None:
        plan = m.prepare_decode(seq_ids, new)
        assert not isinstance(plan, OutOfMemory)
        for sid, n in zip(seq_ids, plan.seq_lens, strict=True):
            m.mark_computed(sid, n)

    def per_call_step(new: list[int]) -> None:
        for sid, tok in zip(seq_ids, new, strict=True):
            assert not isinstance(m.append(sid, [tok]), OutOfMemory)
            n = m.length(sid)
            assert not isinstance(m.prepare_write(sid, n - 1, n), OutOfMemory)
        assert not isinstance(m.prepare_attention(seq_ids), OutOfMemory)
        for sid in seq_ids:
            m.mark_computed(sid, m.length(sid))

    step = batched_step if batched else per_call_step
    samples = []
    for _ in range(256):
        new = tokens(rng, len(seq_ids))
        samples.append(timed(lambda new=new: step(new)))  # type: ignore[misc]
    return medians(samples)


def prefix_lookup(rng: random.Random) -> tuple[float, float, int]:
    m = manager(2100)
    prompt = tokens(rng, 32_768)
    result = m.create(None, prompt + [1])
    assert isinstance(result, CreateResult)
    m.mark_computed(result.seq_id, len(prompt))
    samples = [timed(lambda: m.lookup_prefix(None, prompt)) for _ in range(50)]
    return (*medians(samples), m.lookup_prefix(None, prompt).get(0, 0))


def sharegpt_trace(rng: random.Random, n: int) -> list[tuple[int, int]]:
    def lognormal(mean: float, sigma: float) -> float:
        return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)

    trace = []
    for _ in range(n):
        prompt = min(max(round(lognormal(SHAREGPT["input_mean"], SHAREGPT["input_sigma"])), 1), MAX_LEN - 1)
        out = min(max(round(lognormal(SHAREGPT["output_mean"], SHAREGPT["output_sigma"])), 1), MAX_LEN - prompt)
        trace.append((prompt, out))
    return trace


def run_contiguous(trace: list[tuple[int, int]], budget_tokens: int) -> dict[str, float]:
    slots = budget_tokens // MAX_LEN
    waiting = deque(trace)
    running: list[list[int]] = []  # [tokens held, tokens still to generate]
    held = reserved = peak = steps = concurrent = 0
    while waiting or running:
        while waiting and len(running) < slots:
            prompt, out = waiting.popleft()
            running.append([prompt, out])
        peak = max(peak, len(running))
        if waiting:  # saturated: the budget, not the trace, limits concurrency
            steps += 1
            concurrent += len(running)
        for r in running:
            r[0] += 1
            r[1] -= 1
        held += sum(r[0] for r in running)
        reserved += len(running) * MAX_LEN
        running = [r for r in running if r[1] > 0]
    return {
        "waste_pct": 100 * (1 - held / reserved), "max_concurrent": peak,
        "mean_concurrent": concurrent / steps,
    }


def run_paged(trace: list[tuple[int, int]], budget_tokens: int, rng: random.Random) -> dict[str, float]:
    m = manager(budget_tokens // LAYOUT.block_size)
    waiting = deque((tokens(rng, p), o) for p, o in trace)
    running: dict[int, int] = {}  # seq id -> tokens still to generate
    held = reserved = peak = preempted = steps = concurrent = 0
    watermark = m.usage()[0][Tier.GPU].total // 100  # admission headroom, as vLLM's 1%
    while waiting or running:
        while waiting:
            prompt, out = waiting[0]
            gpu = m.usage()[0][Tier.GPU]
            if running and gpu.free + gpu.cached - LAYOUT.num_blocks_for(len(prompt)) < watermark:
                break
            result = m.create(None, prompt)
            if isinstance(result, OutOfMemory):
                break
            waiting.popleft()
            running[result.seq_id] = out
        ids = list(running)
        plan = m.prepare_decode(ids, tokens(rng, len(ids)))
        while isinstance(plan, OutOfMemory):  # recompute preemption of the newest
            assert len(ids) > 1, "one request alone does not fit"
            victim = ids.pop()
            view = m.sequence(victim)
            waiting.appendleft((view.tokens, running.pop(victim)))
            m.free(victim)
            preempted += 1
            plan = m.prepare_decode(ids, tokens(rng, len(ids)))
        peak = max(peak, len(ids))
        if waiting:
            steps += 1
            concurrent += len(ids)
        held += sum(plan.seq_lens)
        reserved += m.usage()[0][Tier.GPU].used * LAYOUT.block_size
        for sid in ids:
            running[sid] -= 1
            if running[sid] == 0:
                del running[sid]
                m.free(sid)
    return {
        "waste_pct": 100 * (1 - held / reserved), "max_concurrent": peak,
        "mean_concurrent": concurrent / steps, "preemptions": preempted,
    }


def prefix_share(rng: random.Random) -> tuple[float, int, int]:
    system, n, suffix = tokens(rng, 2048), 64, 100
    shared = manager(64 * 140)
    unshared = manager(64 * 140)
    for i in range(n):
        prompt = system + tokens(rng, suffix)
        for m in (shared, unshared):
            result = m.create(None if m is shared else f"tenant{i}", prompt)
            assert isinstance(result, CreateResult)
            m.mark_computed(result.seq_id, len(prompt))
    used = [m.usage()[0][Tier.GPU].used for m in (shared, unshared)]
    return 100 * (1 - used[0] / used[1]), used[0], used[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    budget = 64 * MAX_LEN
    trace = sharegpt_trace(rng, args.requests)
    load = os.getloadavg()[0]
    decode_us, decode_cpu_us = decode_step(rng, batched=True)
    per_call_us, per_call_cpu_us = decode_step(rng, batched=False)
    lookup_us, lookup_cpu_us, lookup_hit = prefix_lookup(rng)
    contiguous, paged = run_contiguous(trace, budget), run_paged(trace, budget, rng)
    saving, shared_blocks, unshared_blocks = prefix_share(rng)
    result: dict[str, Any] = {
        "benchmark": "core",
        "decode_step_us": round(decode_us, 1),
        "decode_step_cpu_us": round(decode_cpu_us, 1),
        "decode_step_per_call_us": round(per_call_us, 1),
        "decode_step_per_call_cpu_us": round(per_call_cpu_us, 1),
        "prefix_lookup_32k_us": round(lookup_us, 1),
        "prefix_lookup_32k_cpu_us": round(lookup_cpu_us, 1),
        "prefix_lookup_32k_cached_tokens": lookup_hit,
        "waste_pct_paged": round(paged["waste_pct"], 2),
        "waste_pct_contiguous": round(contiguous["waste_pct"], 2),
        "max_concurrent_paged": paged["max_concurrent"],
        "max_concurrent_contiguous": contiguous["max_concurrent"],
        "concurrency_ratio": round(paged["max_concurrent"] / contiguous["max_concurrent"], 2),
        "mean_concurrent_saturated_paged": round(paged["mean_concurrent"], 1),
        "mean_concurrent_saturated_contiguous": round(contiguous["mean_concurrent"], 1),
        "preemptions_paged": paged["preemptions"],
        "prefix_share_saving_pct": round(saving, 2),
        "prefix_share_blocks": {"shared": shared_blocks, "unshared": unshared_blocks},
        "trace": {
            "requests": len(trace), "distribution": "log-normal", **SHAREGPT,
            "input_mean_sampled": round(statistics.mean(p for p, _ in trace), 2),
            "output_mean_sampled": round(statistics.mean(o for _, o in trace), 2),
            "max_len": MAX_LEN, "budget_tokens": budget, "block_size": LAYOUT.block_size,
            "seed": args.seed,
        },
        "loadavg_1m_at_start": round(load, 2),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
        return
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    t = result["trace"]
    print(f"trace: {t['requests']} requests, sampled mean input {t['input_mean_sampled']}, "
          f"output {t['output_mean_sampled']} tokens")


if __name__ == "__main__":
    main()
