"""Time spent in kernels, per operation, without stalling the device to measure it.

On CUDA a region is bracketed by two timing events and resolved later (when stats are
read, or once enough regions queue up, those already finished); on the CPU the kernels
run synchronously and a wall clock is exact. A region opened with ``sample=n`` (the
per-layer attention calls: two event records each cost host time on every layer) times
only every n-th call of its name on CUDA; its seconds are scaled up from those timed.
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
        self._timed: dict[str, int] = defaultdict(int)  # CUDA regions actually timed
        self._queued: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        # Event pairs whose region has been read, recorded again by later regions.
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def region(
        self, name: str, stream: torch.cuda.Stream | None = None, *, sample: int = 1
    ) -> Iterator[None]:
        """Time the work queued inside on ``stream`` (default: the current stream); on
        CUDA only every ``sample``-th call of ``name`` (the first one included)."""
        if not self._cuda:
            start = time.perf_counter()
            yield
            self._calls[name] += 1
            self._seconds[name] += time.perf_counter() - start
            return
        if sample > 1 and self._calls[name] % sample:
            yield
            self._calls[name] += 1
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
        self._timed[name] += 1
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
        return {name: self._total(name) for name in sorted(self._calls)}

    def _total(self, name: str) -> dict[str, float]:
        calls, seconds = self._calls[name], self._seconds[name]
        timed = self._timed.get(name, 0)
        if self._cuda and timed and timed < calls:
            seconds *= calls / timed  # sampled: scaled from the regions timed
        return {"calls": calls, "seconds": seconds}
