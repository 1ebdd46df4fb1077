"""Worker handles: a local worker runs calls in submission order, whoever waits first."""

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
    assert third.result() == "C"  # runs a and b first, in their own turn
    assert worker.calls == ["a", "b", "c"]
    assert (first.result(), second.result()) == ("A", "B")
    assert worker.calls == ["a", "b", "c"]  # each ran once


def test_a_later_call_waits_for_an_earlier_one_awaited_by_another_thread() -> None:
    worker = Recorder()
    handle = LocalWorkerHandle(0, worker)
    early = handle.submit("note", "early")
    late = handle.submit("note", "late")
    done = threading.Event()

    def wait_late() -> None:
        late.result()
        done.set()

    thread = threading.Thread(target=wait_late)
    thread.start()
    assert not done.wait(0.2)  # its turn has not come
    assert worker.calls == []
    early.result()
    thread.join(timeout=5)
    assert done.is_set() and worker.calls == ["early", "late"]


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
