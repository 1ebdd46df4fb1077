"""Decode steps of a whole model as one CUDA graph, over the embedded service.

A decode step of a small model is bound by host time: a few hundred small kernels and,
through ``attend``, one service call per layer. When the service is embedded (its
worker in this process, on the model's device), a decode step can instead be planned
once by the coordinator for every layer (``kvservice.decode_steps``) and the model's
whole forward replayed as a CUDA graph whose attention writes and reads the worker's
pools through fixed step buffers (``kvservice.workers.graph_step``).

Graphs are kept per (batch, table width) bucket: a step of ``n`` sequences runs in the
smallest batch bucket >= n (padding rows write nothing) and the smallest width bucket
that holds its longest block table. A bucket is captured on first use, or ahead of time
by ``capture``, with padding rows only (no sequence needed). On a CPU the same path runs
eagerly, uncaptured: it is what the tests check against transformers.

A step this path cannot take (prefill, a batch over several workers, segmented long
sequences, more rows than the largest bucket) returns None and goes through ``attend``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvservice.decode_steps import LocalStep, local_handle, run_local_step
from kvservice.workers.graph_step import DirectDecode, StepBuffers

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_WIDTH = 16  # table entries; widths are powers of two from here


def batch_bucket(n: int) -> int | None:
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def width_bucket(num_blocks: int) -> int:
    width = MIN_WIDTH
    while width < num_blocks:
        width *= 2
    return width


@dataclass(slots=True)
class _Entry:
    buffers: StepBuffers
    decode: DirectDecode
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the graph's output


@dataclass(slots=True)
class GraphStats:
    steps: int = 0  # decode steps run on this path
    replays: int = 0  # of them, through a captured graph
    captures: int = 0
    capture_seconds: float = 0.0
    fallbacks: int = 0  # decode steps the path declined (they went through attend)
    buckets: dict[str, int] = field(default_factory=dict)


class DecodeGraphs:
    """Decode steps of ``model`` (a transformers causal LM with kvservice attention) over
    the embedded coordinator ``coord``; ``forward(buffers, decode)`` runs the model on
    the buffers' rows and returns float32 logits [batch, vocab]."""

    def __init__(
        self,
        coord: Any,
        device: torch.device,
        forward: Callable[[StepBuffers, DirectDecode], torch.Tensor],
        *,
        tenant: str | None = None,
        use_graphs: bool | None = None,
    ) -> None:
        self._coord = coord
        self._device = device
        self._forward = forward
        self._tenant = tenant
        self._use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self._use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._entries: dict[tuple[int, int, int], _Entry] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self._use_graphs else None
        self.stats = GraphStats()

    @staticmethod
    def supports(coord: Any, device: torch.device) -> bool:
        """Whether ``coord`` is an embedded coordinator with a worker on ``device``."""
        handles = getattr(coord, "_handles", None)
        if not handles:
            return False
        for worker_id in handles:
            handle = local_handle(coord, worker_id)
            if handle is None or torch.device(handle.worker.device) != device:
                return False
        return True

    # -- one step ------------------------------------------------------------------------

    def step(
        self, seq_ids: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor | None:
        """Logits [n, vocab] of one decode step (each sequence's one new token, already
        appended, at ``positions``); None when the step must go through ``attend``."""
        n = len(seq_ids)
        batch = batch_bucket(n)
        if batch is None or n == 0:
            self.stats.fallbacks += 1
            return None
        block_size = self._coord.layout().block_size
        width = width_bucket(-(-(max(positions) + 1) // block_size))

        def launch(step: LocalStep) -> torch.Tensor:
            if any(len(row) > width for row in step.block_tables):
                raise RuntimeError("the service's block tables are longer than the positions say")
            entry = self._entry(step.worker, batch, width)
            entry.buffers.fill(step.block_tables, step.seq_lens, token_ids, positions)
            # Swap-ins still in flight (a generator: walked only when there are any).
            step.worker.wait_for_blocks(b for row in step.block_tables for b in row)
            if entry.graph is not None:
                entry.graph.replay()
                assert entry.logits is not None
                self.stats.replays += 1
                return entry.logits[:n].clone()
            return self._forward(entry.buffers, entry.decode)[:n]

        logits = run_local_step(
            self._coord, list(seq_ids), [1] * n, launch, **self._tenant_kwargs()
        )
        if logits is None:
            self.stats.fallbacks += 1
            return None
        self.stats.steps += 1
        key = f"{batch}x{width}"
        self.stats.buckets[key] = self.stats.buckets.get(key, 0) + 1
        return logits

    def capture(self, max_batch: int, max_tokens: int) -> int:
        """Capture every bucket up to ``max_batch`` sequences of ``max_tokens`` tokens
        ahead of time (on each local worker); returns how many graphs exist."""
        if not self._use_graphs:
            return 0
        block_size = self._coord.layout().block_size
        widths = [MIN_WIDTH]
        while widths[-1] < width_bucket(-(-max_tokens // block_size)):
            widths.append(widths[-1] * 2)
        top = batch_bucket(max_batch) or BATCH_BUCKETS[-1]
        for worker_id in list(self._coord._handles):
            handle = local_handle(self._coord, worker_id)
            if handle is None:
                continue
            for batch in (b for b in BATCH_BUCKETS if b <= top):
                for width in widths:
                    self._entry(handle.worker, batch, width)
        return len(self._entries)

    # -- buckets -------------------------------------------------------------------------

    def _tenant_kwargs(self) -> dict[str, str]:
        return {} if self._tenant is None else {"tenant": self._tenant}

    def _entry(self, worker: Any, batch: int, width: int) -> _Entry:
        key = (id(worker), batch, width)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        buffers = StepBuffers.allocate(
            batch, width, worker.layout.block_size, worker.num_gpu_blocks, self._device
        )
        entry = _Entry(buffers, DirectDecode(worker.layer_caches(), buffers))
        if self._use_graphs:
            self._capture(entry)
        self._entries[key] = entry
        return entry

    def _capture(self, entry: _Entry) -> None:
        """Warm up (compiles the kernels' variants) and capture, on padding rows only."""
        start = time.perf_counter()
        current = torch.cuda.current_stream(self._device)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(entry.buffers, entry.decode)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            entry.logits = self._forward(entry.buffers, entry.decode)
        entry.graph = graph
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - start
        logger.debug(
            "captured a decode graph of %d rows x %d table entries",
            entry.buffers.batch, entry.buffers.width,
        )  # fmt: skip
