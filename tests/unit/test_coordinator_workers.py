"""Worker handles: a local worker runs calls once each, in submission order, whoever waits."""

from __future__ import annotations

import threading

import pytest

from kvservice.coordinator_workers import LocalWorkerHandle, WorkerLost, resolve_all


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def note(self, name: str) -> str:
        self.calls.append(name)
        return name.upper()

    def fail(self, name: str) -> None:
        self.calls.append(name)
        raise ValueError(name)


def test_calls_run_in_submission_order_whatever_order_they_are_awaited_in() -> None:
    worker = Recorder()
    handle = LocalWorkerHandle(0, worker)
    first, second, third = (handle.submit("note", n) for n in ("a", "b", "c"))
    assert third.result() == "C"  # runs a and b first, in this thread
    assert worker.calls == ["a", "b", "c"]
    assert (first.result(), second.result()) == ("A", "B")
    assert worker.calls == ["a", "b", "c"]  # each ran once


def test_a_call_in_progress_is_waited_for_not_run_twice() -> None:
    gate = threading.Event()
    started = threading.Event()

    class Slow(Recorder):
        def slow(self, name: str) -> str:
            started.set()
            gate.wait(5)
            return self.note(name)

    worker = Slow()
    handle = LocalWorkerHandle(0, worker)
    early = handle.submit("slow", "early")
    late = handle.submit("note", "late")
    runner = threading.Thread(target=early.result)
    runner.start()
    assert started.wait(5)
    waiter = threading.Thread(target=late.result)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and worker.calls == []  # late waits for early to finish
    gate.set()
    runner.join(5)
    waiter.join(5)
    assert worker.calls == ["early", "late"]
    assert (early.result(), late.result()) == ("EARLY", "LATE")


def test_resolve_all_runs_everything_then_raises_the_first_error() -> None:
    worker = Recorder()
    handle = LocalWorkerHandle(0, worker)
    calls = [handle.submit("note", "a"), handle.submit("fail", "b"), handle.submit("note", "c")]
    with pytest.raises(ValueError, match="b"):
        resolve_all(calls)
    assert worker.calls == ["a", "b", "c"]
    assert handle.call("note", "d") == "D"  # the worker is not stuck behind a failed call


def test_resolve_all_prefers_a_lost_worker() -> None:
    class Lost:
        def result(self) -> None:
            raise WorkerLost(3, RuntimeError("gone"))

    class Bad:
        def result(self) -> None:
            raise ValueError("bad")

    with pytest.raises(WorkerLost) as exc:
        resolve_all([Bad(), Lost()])
    assert exc.value.worker_id == 3
