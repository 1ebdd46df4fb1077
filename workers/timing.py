"""Time spent in kernels, per operation, without stalling the device to measure it.

On CUDA a region is bracketed by two timing events and resolved later (when stats are
read, or once enough regions queue up, those already finished); on the CPU the kernels
run synchronously and a wall clock is exact.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Resolve finished CUDA regions once this many are queued, so the list stays bounded.
_RESOLVE_EVERY = 1024


class KernelTimer:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._calls: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = defaultdict(float)
        self._queued: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        # Event pairs whose region has been read, recorded again by later regions.
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def region(self, name: str, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        """Time the work queued inside on ``stream`` (default: the current stream)."""
        if not self._cuda:
            start = time.perf_counter()
            yield
            self._calls[name] += 1
            self._seconds[name] += time.perf_counter() - start
            return
        if self._spare:
            begin, end = self._spare.pop()
        else:
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
        self._calls[name] += 1
        self._queued.append((name, begin, end))
        if len(self._queued) >= _RESOLVE_EVERY:
            self._resolve(block=False)

    def _resolve(self, *, block: bool) -> None:
        still: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        for name, begin, end in self._queued:
            if block:
                end.synchronize()
            elif not end.query():
                still.append((name, begin, end))
                continue
            self._seconds[name] += begin.elapsed_time(end) / 1e3
            self._spare.append((begin, end))
        self._queued = still

    def totals(self) -> dict[str, dict[str, float]]:
        """``{op: {"calls": n, "seconds": s}}``; waits for queued regions to finish."""
        self._resolve(block=True)
        return {
            name: {"calls": self._calls[name], "seconds": self._seconds[name]}
            for name in sorted(self._calls)
        }
