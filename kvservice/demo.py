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

from kvservice.integrations import Engine, SamplingParams, layout_for, wrap_model
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


def start_service(layout: Any, device: str, num_gpu_blocks: int, num_cpu_blocks: int) -> Any:
    from kvservice import Client

    return Client.embedded(
        layout, device=device, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks
    )


def used_blocks(stats: dict[str, Any]) -> int:
    return sum(
        tier.get("used", 0)
        for worker in stats.get("workers", {}).values()
        for tier in worker.get("tiers", {}).values()
    )


def swap_counts(stats: dict[str, Any]) -> tuple[int, int]:
    swaps = stats.get("swaps", {})
    return swaps.get("out", {}).get("blocks", 0), swaps.get("in", {}).get("blocks", 0)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

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
    client = start_service(layout, device, args.gpu_blocks, args.cpu_blocks)
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
    model = wrap_model(copy.deepcopy(reference), client)
    engine = Engine(
        model,
        max_batch_tokens=256,
        max_batch_seqs=16,
        max_batch_blocks=args.gpu_blocks - 4,
        max_prefill_chunk=128,
    )

    results: dict[int, Any] = {}
    request_ids: dict[int, int] = {}  # workload index -> request id
    live: dict[int, int] = {}  # request -> tokens a contiguous cache would reserve for it
    peak_paged = peak_contiguous = 0
    start = time.perf_counter()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("generating", total=len(workload.prompts), detail="")
        step = 0
        while len(request_ids) < len(workload.prompts) or engine.has_unfinished():
            for i, arrival in enumerate(workload.arrival_steps):
                if arrival == step:
                    params = workload.params[i]
                    request_id = engine.add_request(workload.prompts[i], params)
                    request_ids[i] = request_id
                    live[request_id] = params.num_beams * (
                        len(workload.prompts[i]) + params.max_new_tokens
                    )
            for request_id in engine.step():
                live.pop(request_id)
            results.update(engine.pop_finished())
            stats = client.stats()
            peak_paged = max(peak_paged, used_blocks(stats) * layout.block_bytes)
            peak_contiguous = max(peak_contiguous, sum(live.values()) * layout.token_bytes)
            swapped_out, swapped_in = swap_counts(stats)
            progress.update(
                task,
                completed=len(results),
                detail=f"{engine.stats.num_generated} tokens, "
                f"{swapped_out}/{swapped_in} blocks swapped out/in",
            )
            step += 1
    elapsed = time.perf_counter() - start

    console.print("checking against transformers generate ...")
    outputs = [results[request_ids[i]] for i in range(len(workload.prompts))]
    mismatches = check(reference, workload, outputs, console)
    stats = client.stats()
    swapped_out, swapped_in = swap_counts(stats)
    s = engine.stats
    table = Table(title="kvservice demo", show_header=False)
    table.add_row("tokens generated", f"{s.num_generated} (beam candidates included)")
    table.add_row(
        "tokens/s", f"{s.num_generated / elapsed:.1f} ({s.num_steps} steps, {elapsed:.1f} s)"
    )
    table.add_row(
        "prefix hit rate",
        f"{s.num_cached_tokens / max(1, s.num_prompt_tokens):.0%} of prompt tokens "
        f"({s.num_cached_tokens} of {s.num_prompt_tokens} not recomputed)",
    )
    saved = 1 - peak_paged / peak_contiguous if peak_contiguous else 0.0
    table.add_row(
        "KV memory (peak)",
        f"paged {peak_paged / 2**20:.2f} MiB vs contiguous {peak_contiguous / 2**20:.2f} MiB: "
        f"{saved:.0%} saved",
    )
    table.add_row(
        "swaps",
        f"{swapped_out} blocks out, {swapped_in} blocks in "
        f"({stats.get('swaps', {}).get('out', {}).get('count', 0)} + "
        f"{stats.get('swaps', {}).get('in', {}).get('count', 0)} batched copies)",
    )
    table.add_row("copy-on-write blocks", f"{stats.get('cow_blocks', 0)}")
    table.add_row(
        "matches transformers",
        f"{len(request_ids) - mismatches}/{len(request_ids)} requests"
        + ("" if mismatches == 0 else " [red]MISMATCH[/]"),
    )
    console.print(table)
    client.close()
    return 0 if mismatches == 0 else 1


def check(reference: Any, workload: Workload, results: list[Any], console: Any) -> int:
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
