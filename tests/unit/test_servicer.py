"""The servicer without a socket: which calls run inline on the event loop, and that the
inline path and the thread-pool path answer every request alike (replies and statuses)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from service_fixtures import LAYOUT, NUM_Q_HEADS, make_coordinator, make_handles

from kvservice.coordinator import Coordinator
from kvservice.servicer import KVServicer, workers_in_process
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.wire import encode_tensor


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class Context:
    """The parts of a grpc.aio servicer context the servicer uses."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self._time_remaining = time_remaining

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class RemoteHandle:
    """A worker reached as a Ray actor would be: not a ``LocalWorkerHandle``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.worker_id = inner.worker_id

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.submit(method, *args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.call(method, *args, **kwargs)


def _call(servicer: KVServicer, rpc: str, request: Any, context: Context | None = None) -> Any:
    """The reply's bytes, or the status the call ended with."""

    async def run() -> Any:
        return await getattr(servicer, rpc)(request, context or Context())

    try:
        return asyncio.run(run()).SerializeToString()
    except Aborted as exc:
        return exc.code, exc.details


def _attend_request(seq_ids: list[int], seed: int) -> pb.AttendRequest:
    gen = torch.Generator().manual_seed(seed)
    rows = len(seq_ids)
    request = pb.AttendRequest(layer=0, seq_ids=seq_ids, q_lens=[1] * rows)
    encode_tensor(torch.randn(rows, NUM_Q_HEADS, LAYOUT.head_dim, generator=gen), request.q)
    kv = (rows, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    encode_tensor(torch.randn(kv, generator=gen), request.k_new)
    encode_tensor(torch.randn(kv, generator=gen), request.v_new)
    return request


def _script(servicer: KVServicer) -> list[Any]:
    """The same calls, good and bad, against a fresh coordinator: every answer in order."""
    answers = []
    for tokens in ([1, 2, 3], [1, 2, 3, 4, 5]):
        answers.append(_call(servicer, "CreateSequence", pb.CreateSequenceRequest(tokens=tokens)))
    answers.append(_call(servicer, "Fork", pb.ForkRequest(seq_id=2, n=2)))
    calls: list[tuple[str, Any]] = [
        ("AppendTokens", pb.AppendTokensRequest(seq_ids=[1], tokens=[{"tokens": [7]}])),
        ("AppendTokens", pb.AppendTokensRequest(seq_ids=[99], tokens=[{"tokens": [7]}])),
        ("AppendTokens", pb.AppendTokensRequest(seq_ids=[1], tokens=[])),
        ("AppendTokens", pb.AppendTokensRequest(seq_ids=[1, 3], flat_tokens=[8, 9, 10], token_counts=[1, 2])),
        ("AppendTokens", pb.AppendTokensRequest(seq_ids=[1, 3], flat_tokens=[8], token_counts=[1, 1])),
        (
            "AppendTokens",
            pb.AppendTokensRequest(
                seq_ids=[1], tokens=[{"tokens": [1]}], flat_tokens=[1], token_counts=[1]
            ),
        ),
        ("GetSequence", pb.GetSequenceRequest(seq_id=3)),
        ("GetSequence", pb.GetSequenceRequest(seq_id=1)),
        ("Attend", _attend_request([1], seed=0)),
        ("Attend", _attend_request([1], seed=1)),
        ("Attend", _attend_request([1, 2], seed=2)),  # 2 has no K/V written yet
        ("WriteKV", pb.WriteKVRequest(layer=5, seq_ids=[1], q_lens=[1])),
        ("Truncate", pb.TruncateRequest(seq_id=3, length=2)),
        ("Truncate", pb.TruncateRequest(seq_id=3, length=9)),
        ("LookupPrefix", pb.LookupPrefixRequest(tokens=[1, 2, 3, 4])),
        ("Offload", pb.OffloadRequest(seq_ids=[2])),
        ("Prefetch", pb.PrefetchRequest(seq_ids=[2])),
        ("Free", pb.FreeRequest(seq_ids=[4])),
        ("Free", pb.FreeRequest(seq_ids=[4])),
        ("GetSequence", pb.GetSequenceRequest(seq_id=2)),
        ("GetLayout", pb.GetLayoutRequest()),
    ]
    for rpc, request in calls:
        answers.append(_call(servicer, rpc, request))
    # A deadline already past when the call comes in: refused, never run.
    late = _call(servicer, "Free", pb.FreeRequest(seq_ids=[1]), Context(time_remaining=-1.0))
    answers.append(late)
    answers.append(_call(servicer, "GetSequence", pb.GetSequenceRequest(seq_id=1)))
    return answers


def _served(coordinator: Coordinator, inline_local: bool) -> tuple[KVServicer, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-rpc")
    return KVServicer(executor, coordinator, inline_local=inline_local), executor


def test_inline_and_pool_calls_answer_alike() -> None:
    answers = {}
    for inline in (True, False):
        coordinator = make_coordinator()
        servicer, executor = _served(coordinator, inline)
        assert servicer.inline is inline
        try:
            answers[inline] = _script(servicer)
        finally:
            executor.shutdown()
        coordinator.check_invariants()
    assert answers[True] == answers[False]
    statuses = [a[0] for a in answers[True] if isinstance(a, tuple)]
    assert grpc.StatusCode.NOT_FOUND in statuses
    assert grpc.StatusCode.INVALID_ARGUMENT in statuses
    assert grpc.StatusCode.DEADLINE_EXCEEDED in statuses


def _threads_of(coordinator: Coordinator, method: str) -> list[str]:
    """Wraps ``coordinator.method`` to note the thread each call runs on."""
    names: list[str] = []
    inner: Callable[..., Any] = getattr(coordinator, method)

    def noted(*args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return inner(*args, **kwargs)

    setattr(coordinator, method, noted)
    return names


@pytest.mark.parametrize("inline_local", [True, False])
def test_calls_with_an_undo_keep_the_pool(inline_local: bool) -> None:
    coordinator = make_coordinator()
    servicer, executor = _served(coordinator, inline_local)
    creates = _threads_of(coordinator, "create_sequence")
    appends = _threads_of(coordinator, "append_tokens")
    try:
        _call(servicer, "CreateSequence", pb.CreateSequenceRequest(tokens=[1, 2]))
        _call(servicer, "AppendTokens", pb.AppendTokensRequest(seq_ids=[1], tokens=[{"tokens": [3]}]))
    finally:
        executor.shutdown()
    assert creates[0].startswith("test-rpc")
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop right here
    assert appends == [loop_thread if inline_local else appends[0]]
    assert inline_local or appends[0].startswith("test-rpc")


def test_only_a_coordinator_of_local_workers_is_served_inline() -> None:
    assert workers_in_process(make_coordinator(num_workers=2))
    remote = Coordinator(LAYOUT, [RemoteHandle(h) for h in make_handles()])  # type: ignore[misc]
    assert not workers_in_process(remote)
    mixed = make_handles(num_workers=2)
    assert not workers_in_process(Coordinator(LAYOUT, [mixed[0], RemoteHandle(mixed[1])]))  # type: ignore[list-item]
    assert not workers_in_process(object())  # a wrapper or fake: may block on anything
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        servicer = KVServicer(executor)
        assert not servicer.inline  # nothing attached yet
        servicer.attach(remote)
        assert not servicer.inline
        appends = _threads_of(remote, "append_tokens")
        remote.create_sequence([1, 2])
        _call(servicer, "AppendTokens", pb.AppendTokensRequest(seq_ids=[1], tokens=[{"tokens": [3]}]))
        assert appends and appends[0] != threading.current_thread().name
        servicer.attach(make_coordinator())
        assert servicer.inline
    finally:
        executor.shutdown()


def test_flat_append_tokens_appends_each_sequence_its_own_and_bad_ones_change_nothing() -> None:
    coordinator = make_coordinator()
    servicer, executor = _served(coordinator, True)
    try:
        first = coordinator.create_sequence([1, 2]).seq_id
        second = coordinator.create_sequence([3]).seq_id
        flat = pb.AppendTokensRequest(
            seq_ids=[first, second], flat_tokens=[4, 5, 6], token_counts=[2, 1]
        )
        assert _call(servicer, "AppendTokens", flat) == b""
        bad = [
            pb.AppendTokensRequest(seq_ids=[first, second], flat_tokens=[7, 8], token_counts=[2]),
            pb.AppendTokensRequest(seq_ids=[first, second], flat_tokens=[7], token_counts=[2, -1]),
            pb.AppendTokensRequest(
                seq_ids=[first], tokens=[{"tokens": [7]}], flat_tokens=[7], token_counts=[1]
            ),
            pb.AppendTokensRequest(seq_ids=[first, 99], flat_tokens=[7, 8], token_counts=[1, 1]),
        ]
        for request in bad:
            answer = _call(servicer, "AppendTokens", request)
            assert answer[0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    finally:
        executor.shutdown()
    assert coordinator.manager.sequence(first).tokens == [1, 2, 4, 5]
    assert coordinator.manager.sequence(second).tokens == [3, 6]
    coordinator.check_invariants()
