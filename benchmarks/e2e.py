"""End-to-end generation throughput: transformers' own caches against kvservice.

    python -m benchmarks.e2e [--json] [--small] [--systems a,b,...] [--out FILE]
                             [--profile FILE]

One workload, one model, every system in the same run: a Llama-shaped model of about
1.1B parameters (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 32000, random bf16
weights), 64 requests with ShareGPT-like prompt lengths (log-normal, median 128 tokens,
cut to 4..1024) and 256 new tokens each, greedy, EOS ignored so every request generates
all of its tokens. Systems:

- ``generate``: ``model.generate`` on one left-padded batch with its default cache;
- ``generate_batch``: transformers' paged continuous batching (``model.generate_batch``);
- ``kvservice_embedded``: the model's attention in kvservice, service in this process;
- ``kvservice_grpc``: the same through a gRPC client of a server on 127.0.0.1 (on a thread
  of this process): as a client on the server's host, its calls go to the server's local
  endpoint (a Unix socket);
- ``kvservice_grpc_only``: the same with every call over gRPC itself.

Each system is warmed up first on the whole workload with ``WARMUP_TOKENS`` new tokens,
so that the timed run compiles nothing (JIT kernels are compiled per shape class, and the
timed run meets the same batch sizes and table widths) and grows no allocator pool; then
the garbage collector's current heap is frozen (``gc.freeze``, as serving engines do
after start-up) so that full collections in the timed run scan only what it allocates.
Reported:
output tokens/s (generated tokens over wall time, prefill included), wall seconds and
peak GPU memory (``torch.cuda.max_memory_allocated``, weights included); for kvservice also
how many requests produced exactly the tokens ``generate`` produced (bf16 kernels that sum
in another order may part ways after a near tie, so this is information, not a check).
A system that fails is reported with its error and the others still run.

``--small`` runs a tiny fp32 model and a short workload on the CPU: a check that the
script works end to end, not a measurement. ``--profile FILE`` then runs
``kvservice_embedded`` once more, on the same prompts with a quarter of the new tokens,
under cProfile, and writes where the host time went (by own time and by cumulative time).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import torch

from kvservice.integrations import Engine, SamplingParams, layout_for, wrap_model
from kvservice.integrations.graphs import GraphStats
from kvservice.integrations.reference import random_model

SYSTEMS = (
    "generate",
    "generate_batch",
    "kvservice_embedded",
    "kvservice_grpc",
    "kvservice_grpc_only",
)
BLOCK_SIZE = 16
WARMUP_TOKENS = 8


@dataclass(frozen=True, slots=True)
class Setup:
    model: dict[str, Any]
    dtype: torch.dtype
    num_requests: int
    max_new_tokens: int
    median_prompt: int
    max_prompt: int


FULL = Setup(
    model=dict(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        initializer_range=0.02,
    ),
    dtype=torch.bfloat16,
    num_requests=64,
    max_new_tokens=256,
    median_prompt=128,
    max_prompt=1024,
)
SMALL = Setup(
    model=dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    dtype=torch.float32,
    num_requests=8,
    max_new_tokens=16,
    median_prompt=24,
    max_prompt=96,
)


def prompt_lengths(setup: Setup, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(setup.num_requests, generator=gen, dtype=torch.float64)
    lengths = torch.exp(math.log(setup.median_prompt) + normal).round().long()
    return lengths.clamp(4, setup.max_prompt).tolist()


def make_prompts(setup: Setup, vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [
        torch.randint(3, vocab_size, (n,), generator=gen).tolist()
        for n in prompt_lengths(setup, seed)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(
    model: Any, prompts: list[list[int]], max_new_tokens: int, device: str
) -> list[list[int]]:
    model.set_attn_implementation("sdpa")
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return [row[width:].tolist() for row in out]


def run_generate_batch(
    model: Any, prompts: list[list[int]], max_new_tokens: int, device: str
) -> list[list[int]]:
    from transformers import GenerationConfig

    model.set_attn_implementation("sdpa")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    out = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    by_prompt = {tuple(o.prompt_ids): list(o.generated_tokens) for o in out.values()}
    return [by_prompt[tuple(p)] for p in prompts]


def pool_blocks(prompts: list[list[int]], max_new_tokens: int) -> int:
    """Fast-tier blocks for the whole workload live at once, plus a margin."""
    need = sum(-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in prompts)
    return int(need * 1.1) + 16


class KVServiceRunner:
    """kvservice as a running service: started once (``prepare``, untimed, as a server
    starts before it takes requests: pools allocated, decode graphs captured), then a
    fresh Engine per run over the same service."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.graph_stats: dict[str, Any] | None = None
        self._embedded: Any = None
        self._client: Any = None
        self._server: Any = None
        self._model: Any = None

    def prepare(
        self, model: Any, prompts: list[list[int]], max_new_tokens: int, device: str
    ) -> None:
        from kvservice import Client

        self.close()
        layout = layout_for(
            model.config, dtype=str(model.dtype).removeprefix("torch."), block_size=BLOCK_SIZE
        )
        self._embedded = Client.embedded(
            layout,
            device=device,
            num_gpu_blocks=pool_blocks(prompts, max_new_tokens),
            num_cpu_blocks=64,
        )
        self._client = self._embedded
        if self.transport.startswith("grpc"):
            from kvservice.server import ServerThread

            self._server = ServerThread(self._embedded.service, host="127.0.0.1", port=0)
            local = self.transport != "grpc-only"
            self._client = Client.grpc(self._server.address, local_endpoint=local)
        self._model = wrap_model(model, self._client)
        self._model.capture_graphs(len(prompts), max(map(len, prompts)) + max_new_tokens)

    def __call__(
        self, model: Any, prompts: list[list[int]], max_new_tokens: int, device: str
    ) -> list[list[int]]:
        if self._model is None or self._model.model is not model:
            self.prepare(model, prompts, max_new_tokens, device)
        engine = Engine(
            self._model,
            max_batch_tokens=4096,
            max_batch_seqs=len(prompts),
            max_prefill_chunk=2048,
        )
        params = SamplingParams(max_new_tokens=max_new_tokens)
        graphs = self._model.graphs
        if graphs is not None:  # this run's figures (captures made in prepare stay counted)
            graphs.stats = GraphStats(
                captures=graphs.stats.captures, capture_seconds=graphs.stats.capture_seconds
            )
        request_ids = [engine.add_request(p, params) for p in prompts]
        results = engine.run()
        if graphs is not None:
            self.graph_stats = dataclasses.asdict(graphs.stats)
        return [results[r].tokens for r in request_ids]

    def close(self) -> None:
        if self._client is not None and self._client is not self._embedded:
            self._client.close()
        if self._server is not None:
            self._server.stop(grace=1.0)
        if self._embedded is not None:
            self._embedded.close()
        self._embedded = self._client = self._server = self._model = None


RUNNERS: dict[str, Callable[..., list[list[int]]]] = {
    "generate": run_generate,
    "generate_batch": run_generate_batch,
    "kvservice_embedded": KVServiceRunner("embedded"),
    "kvservice_grpc": KVServiceRunner("grpc"),
    "kvservice_grpc_only": KVServiceRunner("grpc-only"),
}


def measure(
    name: str, model: Any, prompts: list[list[int]], max_new_tokens: int, device: str
) -> dict[str, Any]:
    runner = RUNNERS[name]
    try:
        return {"system": name} | _measure(runner, model, prompts, max_new_tokens, device)
    finally:
        if isinstance(runner, KVServiceRunner):
            runner.close()


def _measure(
    runner: Callable[..., list[list[int]]],
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: str,
) -> dict[str, Any]:
    if isinstance(runner, KVServiceRunner):
        runner.prepare(model, prompts, max_new_tokens, device)
    # Warm-up prompts of the same lengths but other tokens: a service keeps its prefix
    # cache between runs, and the timed run must find none of its prompts there.
    vocab = model.config.vocab_size
    warm = [[3 + (t - 2) % (vocab - 3) for t in p] for p in prompts]
    runner(model, warm, min(WARMUP_TOKENS, max_new_tokens), device)  # compile, allocate
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    gc.freeze()
    try:
        start = time.perf_counter()
        outputs = runner(model, prompts, max_new_tokens, device)
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        gc.unfreeze()
    num_tokens = sum(len(o) for o in outputs)
    row: dict[str, Any] = {
        "output_tokens": num_tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(num_tokens / seconds, 1),
    }
    if device.startswith("cuda"):
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if isinstance(runner, KVServiceRunner) and runner.graph_stats is not None:
        row["decode_graphs"] = runner.graph_stats
    row["_outputs"] = outputs
    return row


def versions() -> dict[str, str]:
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    parser.add_argument("--small", action="store_true", help="tiny model and workload (CPU check)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {SYSTEMS}")
    parser.add_argument(
        "--device", default=None, help="default: cuda when present (cpu with --small)"
    )
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--profile", default=None, help="cProfile kvservice_embedded into FILE")
    args = parser.parse_args(argv)

    setup = SMALL if args.small else FULL
    if args.num_requests:
        setup = dataclasses.replace(setup, num_requests=args.num_requests)
    if args.max_new_tokens:
        setup = dataclasses.replace(setup, max_new_tokens=args.max_new_tokens)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {SYSTEMS}")

    if device == "cpu":
        torch.set_num_threads(1)  # the small model's matmuls are too small to split
    model = random_model("llama", dtype=setup.dtype, device=device, seed=args.seed, **setup.model)
    prompts = make_prompts(setup, model.config.vocab_size, args.seed)
    rows: list[dict[str, Any]] = []
    for name in systems:
        try:
            rows.append(measure(name, model, prompts, setup.max_new_tokens, device))
        except Exception as exc:  # one broken system must not lose the others' numbers
            rows.append({"system": name, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
        gc.collect()

    reference = next(
        (r["_outputs"] for r in rows if r["system"] == "generate" and "_outputs" in r), None
    )
    for row in rows:
        outputs = row.pop("_outputs", None)
        if reference is not None and outputs is not None and row["system"] != "generate":
            row["requests_matching_generate"] = sum(
                a == b for a, b in zip(outputs, reference, strict=True)
            )
    baselines = [
        r["output_tok_s"]
        for r in rows
        if r["system"] in ("generate", "generate_batch") and "output_tok_s" in r
    ]
    if baselines:
        for row in rows:
            if row["system"].startswith("kvservice") and "output_tok_s" in row:
                row["speedup_vs_best_baseline"] = round(row["output_tok_s"] / max(baselines), 2)

    result = {
        "benchmark": "e2e",
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "versions": versions(),
        "setup": {
            "small": bool(args.small),
            "model": setup.model,
            "dtype": str(setup.dtype).removeprefix("torch."),
            "num_requests": setup.num_requests,
            "max_new_tokens": setup.max_new_tokens,
            "prompt_tokens": sum(map(len, prompts)),
        },
        "results": rows,
    }
    if args.profile:
        profile(model, prompts, max(1, setup.max_new_tokens // 4), device, args.profile)
    print_table(rows, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


def profile(
    model: Any, prompts: list[list[int]], max_new_tokens: int, device: str, path: str
) -> None:
    """Host time of one kvservice_embedded run, by function (cProfile adds its own cost
    per call, so the shares matter more than the totals)."""
    import cProfile
    import io
    import pstats

    runner = KVServiceRunner("embedded")
    try:
        runner.prepare(model, prompts, max_new_tokens, device)
        runner(model, prompts[:2], 4, device)
        sync(device)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        runner(model, prompts, max_new_tokens, device)
        sync(device)
        profiler.disable()
        seconds = time.perf_counter() - start
    finally:
        runner.close()
    text = io.StringIO()
    print(f"kvservice_embedded, {len(prompts)} requests x {max_new_tokens} new tokens: "
          f"{seconds:.3f} s under the profiler", file=text)  # fmt: skip
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumtime").print_stats(60)
    with open(path, "w") as f:
        f.write(text.getvalue())


def print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    print(
        f"{'system':<20} {'tok/s':>10} {'seconds':>9} {'peak GiB':>9} {'speedup':>8}  note",
        file=out,
    )
    for r in rows:
        print(
            f"{r['system']:<20} {r.get('output_tok_s', '-'):>10} {r.get('seconds', '-'):>9} "
            f"{r.get('peak_gpu_mem_gib', '-'):>9} {r.get('speedup_vs_best_baseline', '-'):>8}  "
            f"{r.get('error', '')}",
            file=out,
        )


if __name__ == "__main__":
    raise SystemExit(main())
