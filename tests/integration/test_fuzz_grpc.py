"""Fuzzing the gRPC API on 127.0.0.1 (the short run; ``kvservice bench fuzz`` is the long one).

Hypothesis draws requests built directly from the kvservice.v1 messages, or raw bytes
that are no message at all (``kvservice.bench.fuzz``): every reply must be OK or one of
the status table's codes for a bad call, never UNKNOWN or INTERNAL, and the
coordinator's invariants (the ledger summing to the pool sizes, ...) must hold after
every call. Each generated case starts from a fresh coordinator, so a failure shrinks
to a short, replayable case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvservice.bench.fuzz import Call, FuzzFailure, FuzzSession
from kvservice.bench.target import Target, open_target
from kvservice.layouts import get_layout
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.wire import message_options

pytestmark = pytest.mark.integration

CALLS_PER_CASE = 25
LAYOUT = get_layout("tiny", block_size=4)  # what kvservice.bench.target serves


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with open_target() as t:
        yield t


@pytest.fixture(scope="module")
def channel(target: Target) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target.address, options=message_options()) as ch:
        yield ch


codes: Counter[str] = Counter()


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_calls_get_proper_statuses_and_keep_the_invariants(
    target: Target, channel: grpc.Channel, data: st.DataObject
) -> None:
    target.fresh_service()
    coordinator = target.coordinator
    assert coordinator is not None
    session = FuzzSession(channel, LAYOUT, check=coordinator.check_invariants, codes=codes)
    for _ in range(CALLS_PER_CASE):
        session.step(data)


def test_the_fuzz_run_reached_past_validation() -> None:
    """The run above must have exercised the service, not only its argument checks."""
    if not codes:
        pytest.skip("the fuzz test did not run")
    ok = {key.split(":")[0] for key, n in codes.items() if key.endswith(":OK")}
    assert {"CreateSequence", "AppendTokens", "Fork", "Free", "Attend", "WriteKV"} <= ok, codes
    by_code = Counter({key.split(":")[1]: n for key, n in codes.items()})
    for name in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"):
        assert any(key.endswith(name) for key in codes), (name, by_code)


def test_the_checks_catch_a_server_fault_and_a_broken_invariant(
    target: Target, channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    target.fresh_service()
    coordinator = target.coordinator
    assert coordinator is not None
    broken = {"now": False}

    def check() -> None:
        assert not broken["now"], "the ledger does not sum to the pool size"

    session = FuzzSession(channel, LAYOUT, check=check)
    # Bytes that are no CreateSequenceRequest: INVALID_ARGUMENT, which passes.
    session.run(Call("CreateSequence", b"\x08\xff\xff", None, "corrupt varint"))
    session.run(Call("Stats", b"", None, "Stats()"))

    def crash() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(coordinator, "stats", crash)
    with pytest.raises(FuzzFailure, match="INTERNAL"):
        session.run(Call("Stats", b"", None, "Stats()"))
    broken["now"] = True
    with pytest.raises(FuzzFailure, match="invariant broken"):
        session.run(Call("GetLayout", b"", None, "GetLayout()"))
    broken["now"] = False
    tokens = pb.CreateSequenceRequest(tokens=[1, 2, 3]).SerializeToString()
    wrong = Call("CreateSequence", tokens, None, "create", check_reply=lambda _r: _fail())
    with pytest.raises(FuzzFailure, match="the reply is wrong"):
        session.run(wrong)


def _fail() -> None:
    raise AssertionError("not what was asked")
