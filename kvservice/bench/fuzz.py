"""Fuzzing the gRPC API: random and malformed KVService requests, sent as raw protobuf.

The requests (``kvservice.bench.fuzz_calls``) go out through a bare channel with no
client-side checks, so the server sees what a buggy or hostile client can send.
The property, checked after every call (``FuzzSession.run``):
- the reply is OK or one of ``EXPECTED_CODES`` (the status table's codes for a bad call);
  UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED and the rest are failures;
- an OK reply parses as the method's reply and says what it must (attention output of
  the asked shape, as many children as asked, ...);
- when the server is ours, the coordinator's invariants hold (``check_invariants``:
  the core manager's ledger sums to the pool sizes, and the coordinator's own books).

``tests/integration/test_fuzz_grpc.py`` runs a short version; ``kvservice bench fuzz
--calls N`` a long one (``main``): cases of ``--calls-per-case`` calls, each case on a
fresh coordinator when the server is ours, so a failure shrinks to a short case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from hypothesis import strategies as st

from kvservice.bench.fuzz_calls import Call, CallMaker
from kvservice.core.layout import Layout
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.wire import TENANT_KEY, layout_from_proto, message_options

SERVICE_PREFIX = "/kvservice.v1.KVService/"
# What a healthy server may answer: OK, or the status table's codes for a call that is
# wrong or does not fit. DATA_LOSS (no worker is lost here), UNAVAILABLE (it is not
# shutting down) and the authentication codes (no tokens) are failures too.
EXPECTED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
CALL_TIMEOUT_S = 60.0


class FuzzFailure(AssertionError):
    pass


class FuzzSession:
    """Sends calls to one server and checks the property after each (``run``, ``step``).

    ``check`` runs after every call (the coordinator's invariants when the server is
    ours); ``codes`` counts the replies as "Method:CODE".
    """

    def __init__(
        self,
        channel: grpc.Channel,
        layout: Layout,
        *,
        token: str | None = None,
        check: Callable[[], None] | None = None,
        codes: Counter[str] | None = None,
    ) -> None:
        self._channel = channel
        self._rpcs: dict[str, Any] = {}
        self._token = token
        self._check = check
        self.codes: Counter[str] = codes if codes is not None else Counter()
        self.calls = CallMaker(layout)

    # ---------------------------------------------------------------- sending

    def send(self, call: Call) -> tuple[grpc.StatusCode, bytes | None, str]:
        rpc = self._rpcs.get(call.method)
        if rpc is None:
            rpc = self._rpcs[call.method] = self._channel.unary_unary(SERVICE_PREFIX + call.method)
        metadata: list[tuple[str, str]] = []
        if call.tenant is not None:
            metadata.append((TENANT_KEY, call.tenant))
        if self._token is not None:
            metadata.append(("authorization", f"Bearer {self._token}"))
        try:
            reply = rpc(call.payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code(), None, exc.details() or ""
        return grpc.StatusCode.OK, reply, ""

    def step(self, data: st.DataObject) -> None:
        """Draw one call, send it, and check the property (FuzzFailure if broken)."""
        self.run(self.calls.draw(data))

    def run(self, call: Call) -> None:
        """Send ``call`` and check the property (FuzzFailure if broken)."""
        code, reply, details = self.send(call)
        self.codes[f"{call.method}:{code.name}"] += 1
        if code not in EXPECTED_CODES:
            raise FuzzFailure(f"{call.describe} -> {code.name}: {details}")
        if reply is not None:
            try:
                if call.check_reply is not None:
                    call.check_reply(reply)
                if call.on_ok is not None:
                    call.on_ok(reply)
            except Exception as exc:
                raise FuzzFailure(f"{call.describe} -> OK, but the reply is wrong: {exc!r}") from exc
        if self._check is not None:
            try:
                self._check()
            except AssertionError as exc:
                raise FuzzFailure(f"after {call.describe}: invariant broken: {exc}") from exc



# ------------------------------------------------------------------------- the long run


@dataclass
class FuzzReport:
    calls: int = 0
    seconds: float = 0.0
    invariants_checked: bool = False
    codes: Counter[str] = field(default_factory=Counter)
    failure: str | None = None

    def as_dict(self) -> dict[str, Any]:
        by_code: Counter[str] = Counter()
        for key, n in self.codes.items():
            by_code[key.split(":")[1]] += n
        return {
            "calls": self.calls,
            "seconds": round(self.seconds, 2),
            "calls_per_s": round(self.calls / self.seconds, 1) if self.seconds else 0.0,
            "invariants_checked": self.invariants_checked,
            "codes": dict(sorted(by_code.items())),
            "by_method": dict(sorted(self.codes.items())),
            "failure": self.failure,
        }


def run_fuzz(
    address: str | None = None,
    *,
    calls: int = 10_000,
    calls_per_case: int = 25,
    seed: int | None = None,
    token: str | None = None,
) -> FuzzReport:
    """Fuzz a server (ours on 127.0.0.1 when ``address`` is None) with about ``calls``
    requests in cases of ``calls_per_case``; stops at the first broken property, which
    hypothesis then shrinks to a short case (``FuzzReport.failure``)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    from kvservice.bench.target import open_target

    report = FuzzReport()
    examples = max(1, math.ceil(calls / calls_per_case))
    with open_target(address, token=token) as target:
        channel = grpc.insecure_channel(target.address, options=message_options())
        try:
            layout = layout_from_proto(
                pb.Layout.FromString(
                    channel.unary_unary(SERVICE_PREFIX + "GetLayout")(b"", timeout=CALL_TIMEOUT_S)
                )
            )
            report.invariants_checked = target.own

            @settings(
                max_examples=examples, deadline=None, database=None, print_blob=True,
                phases=(Phase.generate, Phase.shrink),
                suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            @given(st.data())
            def case(data: st.DataObject) -> None:
                check = None
                if target.own:
                    target.fresh_service()
                    check = target.coordinator.check_invariants  # type: ignore[union-attr]
                session = FuzzSession(channel, layout, token=token, check=check, codes=report.codes)
                for _ in range(calls_per_case):
                    report.calls += 1
                    session.step(data)

            if seed is not None:
                case = fixed_seed(seed)(case)
            start = time.perf_counter()
            try:
                case()
            except FuzzFailure as exc:
                report.failure = str(exc)
            except BaseExceptionGroup as group:  # hypothesis found several distinct failures
                report.failure = "\n".join(str(e) for e in group.exceptions)
            report.seconds = time.perf_counter() - start
        finally:
            channel.close()
    return report


def main(args: argparse.Namespace) -> int:
    report = run_fuzz(
        args.address, calls=args.calls, calls_per_case=args.calls_per_case, seed=args.seed,
        token=args.token,
    )  # fmt: skip
    result = report.as_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0 if report.failure is None else 1


def _print_table(result: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(
        f"fuzz: {result['calls']} calls in {result['seconds']} s "
        f"({result['calls_per_s']}/s), invariants checked: {result['invariants_checked']}\n"
    )
    for code, n in result["codes"].items():
        out.write(f"  {code:<22}{n:>8}\n")
    out.write(f"failure: {result['failure']}\n" if result["failure"] else "no failure\n")
