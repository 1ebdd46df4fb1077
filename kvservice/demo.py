"""``kvservice demo``: a small transformer generating through the embedded service.

It starts the service in this process (on the GPU when there is one), wraps a small
random-weight Llama so that its attention runs in the service, and serves one workload
with continuous batching: chat requests that share a system prompt and arrive over time
(prefix reuse), a long prompt (chunked prefill), and a beam search of width 4 (fork and
copy-on-write). The fast tier is sized below the workload, so sequences are swapped to
the slow tier and back while they generate. Every output is then checked against
transformers' own ``generate`` on the same weights, and a short report follows.

Exit status 0 when every output matches the reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvservice import Client
from kvservice.integrations import (
    Engine,
    GenerationResult,
    SamplingParams,
    layout_for,
    wrap_model,
)
from kvservice.integrations.reference import random_model, reference_generate

EOS = 2
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]
    arrival_steps: list[int]


def make_workload(vocab_size: int, *, seed: int = 0, num_chats: int = 24) -> Workload:
    """Chats sharing a 48-token system prompt, one long prompt, one beam search."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab_size, (n,), generator=gen).tolist()

    system = tokens(3 * BLOCK_SIZE)
    chat = SamplingParams(max_new_tokens=48, eos_token_ids=(EOS,))
    prompts = [system + tokens(int(n)) for n in torch.randint(4, 40, (num_chats,), generator=gen)]
    params = [chat] * num_chats
    # The first chat warms the prefix cache; the others join while it runs.
    arrivals = [0] + [2 + i // 2 for i in range(num_chats - 1)]
    prompts.append(tokens(300))
    params.append(SamplingParams(max_new_tokens=24, eos_token_ids=(EOS,)))
    arrivals.append(1)
    prompts.append(system + tokens(8))
    params.append(SamplingParams(max_new_tokens=16, num_beams=4, eos_token_ids=(EOS,)))
    arrivals.append(3)
    return Workload(prompts, params, arrivals)


@dataclass(slots=True)
class Served:
    """What serving the workload produced and measured."""

    results: list[GenerationResult]  # in workload order
    seconds: float
    peak_paged_bytes: int  # blocks in use (both tiers) times block bytes
    peak_contiguous_bytes: int  # what per-request max-length caches would reserve


def used_blocks(stats: dict[str, Any]) -> int:
    return sum(
        tier["used"] for worker in stats["workers"].values() for tier in worker["tiers"].values()
    )


def serve(engine: Engine, client: Client, workload: Workload, progress: Any) -> Served:
    """Feed the requests in at their arrival steps and step until all have finished."""
    layout = client.layout
    task = progress.add_task("generating", total=len(workload.prompts), detail="")
    request_ids: dict[int, int] = {}  # workload index -> request id
    reserved: dict[int, int] = {}  # live request -> tokens a contiguous cache reserves
    results: dict[int, GenerationResult] = {}
    peak_paged = peak_contiguous = 0
    start = time.perf_counter()
    step = 0
    while len(request_ids) < len(workload.prompts) or engine.has_unfinished():
        for i, arrival in enumerate(workload.arrival_steps):
            if arrival == step:
                prompt, params = workload.prompts[i], workload.params[i]
                request_ids[i] = engine.add_request(prompt, params)
                reserved[request_ids[i]] = params.num_beams * (len(prompt) + params.max_new_tokens)
        for request_id in engine.step():
            del reserved[request_id]
        results.update(engine.pop_finished())
        stats = client.stats()
        peak_paged = max(peak_paged, used_blocks(stats) * layout.block_bytes)
        peak_contiguous = max(peak_contiguous, sum(reserved.values()) * layout.token_bytes)
        swaps = stats["swaps"]
        progress.update(
            task,
            completed=len(results),
            detail=f"{engine.stats.num_generated} tokens, "
            f"{swaps['out']['blocks']}/{swaps['in']['blocks']} blocks swapped out/in",
        )
        step += 1
    seconds = time.perf_counter() - start
    ordered = [results[request_ids[i]] for i in range(len(workload.prompts))]
    return Served(ordered, seconds, peak_paged, peak_contiguous)


def check(reference: Any, workload: Workload, results: list[GenerationResult], console: Any) -> int:
    """Count requests whose tokens differ from transformers' generate on the same weights."""
    mismatches = 0
    groups: dict[SamplingParams, list[int]] = {}
    for i, params in enumerate(workload.params):
        groups.setdefault(params, []).append(i)
    for params, indices in groups.items():
        expected = reference_generate(reference, [workload.prompts[i] for i in indices], params)
        for i, tokens in zip(indices, expected, strict=True):
            if results[i].tokens != tokens:
                mismatches += 1
                console.print(f"[red]request {i}[/]: got {results[i].tokens}, expected {tokens}")
    return mismatches


def report(served: Served, engine: Engine, stats: dict[str, Any], mismatches: int) -> Any:
    from rich.table import Table

    s = engine.stats
    swaps = stats["swaps"]
    saved = 1 - served.peak_paged_bytes / max(1, served.peak_contiguous_bytes)
    num_requests = len(served.results)
    table = Table(title="kvservice demo", show_header=False)
    table.add_row("tokens generated", f"{s.num_generated} (beam candidates included)")
    table.add_row(
        "tokens/s",
        f"{s.num_generated / served.seconds:.1f} ({s.num_steps} steps, {served.seconds:.1f} s)",
    )
    table.add_row(
        "prefix hit rate",
        f"{s.num_cached_tokens / max(1, s.num_prompt_tokens):.0%} of prompt tokens "
        f"({s.num_cached_tokens} of {s.num_prompt_tokens} not recomputed)",
    )
    table.add_row(
        "KV memory (peak)",
        f"paged {served.peak_paged_bytes / 2**20:.2f} MiB vs contiguous "
        f"{served.peak_contiguous_bytes / 2**20:.2f} MiB: {saved:.0%} saved",
    )
    table.add_row(
        "swaps",
        f"{swaps['out']['blocks']} blocks out, {swaps['in']['blocks']} blocks in "
        f"({swaps['out']['count']} + {swaps['in']['count']} batched copies)",
    )
    table.add_row("copy-on-write blocks", f"{stats['cow_blocks']}")
    table.add_row(
        "matches transformers",
        f"{num_requests - mismatches}/{num_requests} requests"
        + ("" if mismatches == 0 else " [red]MISMATCH[/]"),
    )
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # A small model's matmuls are too small to split: threads only wait on each other.
        torch.set_num_threads(1)
    reference = random_model(
        "llama",
        vocab_size=1024,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        device=device,
    )
    layout = layout_for(reference.config, dtype="float32", block_size=BLOCK_SIZE)
    workload = make_workload(reference.config.vocab_size, num_chats=args.num_chats)
    num_params = sum(p.numel() for p in reference.parameters())
    console.print(
        f"[bold]kvservice demo[/] on {device}: a Llama of {num_params / 1e6:.1f}M random weights, "
        f"{layout.num_layers} layers; KV blocks of {layout.block_size} tokens "
        f"({layout.block_bytes // 1024} KiB)\n"
        f"workload: {args.num_chats} chats sharing a {3 * BLOCK_SIZE}-token system prompt, "
        "arriving over time; a 300-token prompt (chunked prefill); a 4-beam search\n"
        f"device tier {args.gpu_blocks} blocks "
        f"({args.gpu_blocks * layout.block_bytes / 2**20:.1f} MiB, too few for the workload: "
        f"sequences swap), host tier {args.cpu_blocks} blocks"
    )
    with Client.embedded(
        layout, device=device, num_gpu_blocks=args.gpu_blocks, num_cpu_blocks=args.cpu_blocks
    ) as client:
        engine = Engine(
            wrap_model(copy.deepcopy(reference), client),
            max_batch_tokens=256,
            max_batch_seqs=16,
            max_batch_blocks=args.gpu_blocks - 4,
            max_prefill_chunk=128,
        )
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            served = serve(engine, client, workload, progress)
        console.print("checking against transformers generate ...")
        mismatches = check(reference, workload, served.results, console)
        console.print(report(served, engine, client.stats(), mismatches))
    return 0 if mismatches == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvservice demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--num-chats", type=int, default=24, help="chat requests sharing a prompt")
    parser.add_argument(
        "--gpu-blocks", type=int, default=64, help="device-tier blocks (few: forces swapping)"
    )
    parser.add_argument("--cpu-blocks", type=int, default=512, help="host-tier blocks")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
