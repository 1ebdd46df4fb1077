"""The kernel timer on CUDA, with fake events: sampled regions are scaled up."""

from __future__ import annotations

import pytest
import torch
from kvservice.workers import timing


class FakeEvent:
    """A timing event on a fake clock: each record() reads the next tick (1 ms apart)."""

    clock = 0.0
    records = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at: float | None = None

    def record(self, stream: object = None) -> None:
        FakeEvent.clock += 1.0
        FakeEvent.records += 1
        self.at = FakeEvent.clock

    def query(self) -> bool:
        return self.at is not None

    def synchronize(self) -> None:
        assert self.at is not None

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return end.at - self.at


def test_sampled_regions_count_every_call_and_scale_the_timed_ones(monkeypatch) -> None:
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(FakeEvent, "records", 0)
    timer = timing.KernelTimer(torch.device("cuda", 0))
    for _ in range(10):
        with timer.region("decode", sample=4):
            pass
        with timer.region("copy"):
            pass
    totals = timer.totals()
    # decode: calls 0, 4 and 8 timed (3 ms in all), scaled up to 10 calls; copy: all timed
    assert totals["decode"] == {"calls": 10, "seconds": pytest.approx(3e-3 * 10 / 3)}
    assert totals["copy"] == {"calls": 10, "seconds": pytest.approx(1e-3 * 10)}
    assert FakeEvent.records == 2 * (3 + 10)


def test_a_failed_region_is_not_counted(monkeypatch) -> None:
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    timer = timing.KernelTimer(torch.device("cuda", 0))
    with pytest.raises(ValueError), timer.region("decode", sample=4):
        raise ValueError("bad")
    with timer.region("decode", sample=4):
        pass
    assert timer.totals()["decode"] == {"calls": 1, "seconds": pytest.approx(1e-3)}


def test_call_times_report_the_median_of_recent_calls_beside_the_mean(monkeypatch) -> None:
    # Three 1 ms calls and one stalled 10 ms call: the mean says 3.25 ms, the median 1 ms.
    import itertools

    import kvservice.workers.worker as worker_module
    from worker_helpers import make_worker

    worker = make_worker()
    ticks = itertools.accumulate(itertools.cycle([0.0, 0.001, 0.0, 0.001, 0.0, 0.001, 0.0, 0.010]))
    monkeypatch.setattr(worker_module.time, "perf_counter", lambda: next(ticks))
    for _ in range(4):
        worker.copy_blocks([])
    monkeypatch.undo()
    entry = worker.stats()["call_time"]["copy_blocks"]
    assert entry["calls"] == 4 and entry["recent_calls"] == 4
    assert entry["seconds"] == pytest.approx(0.013)
    assert entry["recent_median_s"] == pytest.approx(0.001)
    for _ in range(worker_module.RECENT_CALLS + 5):
        worker.copy_blocks([])
    assert worker.stats()["call_time"]["copy_blocks"]["recent_calls"] == worker_module.RECENT_CALLS
