"""Decode attention replayed from CUDA graphs, for calls whose output leaves the device at
once (``Worker.attend_to_host``: a step ticket's calls).

A decode call costs the worker's host a few hundred microseconds besides the kernel: output
and split buffers allocated, the decode kernel's and the merge's Triton launches. Replaying
a graph of the same kernels costs one launch. A graph bakes in its tensors' addresses, so
each is captured over fixed buffers (q, the block tables and lengths, the new K/V and its
slots) that every call refills on the stream before the replay; the tables' contents change
freely, only their shape is part of the graph's key (with the layer, q's shape, the scale
and whether the call writes K/V and returns the LSE): a key seen again replays.

Invariants:
- A replay's output is the graph's own buffer, overwritten by the next replay of that
  graph: only a caller that copies it off the device on the same stream before queuing
  anything else may take it (the next replay is ordered after that copy).
- A key's first ``CAPTURE_AFTER`` calls run their kernels directly (that also compiles
  them); the last of them then captures the graph. Capturing does not run the kernels, so
  nothing is written twice. A capture costs a device synchronization (torch's capture
  does one), so keys that come and go (a batch whose size keeps changing) are never
  captured, and one that recurs is captured once.
- At most ``max_graphs`` graphs are kept, the least recently used going first. Each holds
  a private memory pool (its split buffers; torch rounds them up to 20 MiB segments)
  outside the block pools' budget, which is why a worker keeps none unless asked
  (``Worker(decode_graphs=N)``): N should cover a graph per layer, or they thrash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvservice import kernels

DEFAULT_MAX_GRAPHS = 0  # a worker's default: none (see above)
# Calls of one key that run directly; the last of them captures its graph.
CAPTURE_AFTER = 3


class Sightings:
    """How many times each recent key was seen (the ``size`` most recently seen kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._counts: OrderedDict[Any, int] = OrderedDict()

    def see(self, key: Any) -> int:
        """Count one more sighting of ``key``; returns its count so far."""
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        if len(self._counts) > self.size:
            self._counts.popitem(last=False)
        return count

    def forget(self, key: Any) -> None:
        self._counts.pop(key, None)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the buffers refilled before each replay
    output: Any  # a tensor, or (out, lse)


class DecodeGraphs:
    """Per worker: decode calls by graph key, captured on a key's first call."""

    def __init__(self, max_graphs: int) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._sightings = Sightings(4 * max_graphs)
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self), "captures": self.captures, "replays": self.replays}

    def decode(
        self,
        layer: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float | None,
        return_lse: bool,
        writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        """``paged_decode`` (after ``write_kv`` of ``writes`` = (k_new, v_new, slots)) on
        the current stream, from a graph when this key was seen before."""
        inputs = (q, block_tables, seq_lens, *(writes or ()))
        key = (
            layer, scale, return_lse,
            *((tuple(t.shape), t.dtype) for t in inputs),
        )  # fmt: skip
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            for buffer, value in zip(entry.inputs, inputs, strict=True):
                buffer.copy_(value, non_blocking=True)
            entry.graph.replay()
            self.replays += 1
            return entry.output

        def run(args: tuple[torch.Tensor, ...]) -> Any:
            q_, tables, lens = args[:3]
            if writes is not None:
                kernels.write_kv(k_cache, v_cache, *args[3:], check_indices=False)
            return kernels.paged_decode(
                q_, k_cache, v_cache, tables, lens,
                scale=scale, return_lse=return_lse, check_indices=False,
            )  # fmt: skip

        result = run(inputs)  # this call's own result; compiles what a graph would hold
        if self._sightings.see(key) >= CAPTURE_AFTER:
            self._sightings.forget(key)
            self._capture(key, inputs, run)
        return result

    def _capture(
        self,
        key: tuple[Any, ...],
        inputs: tuple[torch.Tensor, ...],
        run: Callable[[tuple[torch.Tensor, ...]], Any],
    ) -> None:
        stream = torch.cuda.current_stream()
        buffers = tuple(torch.empty_like(t) for t in inputs)
        graph = torch.cuda.CUDAGraph()
        # On a side stream after this one's work; thread-local capture, so another thread
        # waiting for an earlier call's output is not an error meanwhile.
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            output = run(buffers)
        stream.wait_stream(side)
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[key] = _Graph(graph, buffers, output)
        self.captures += 1
