"""The local channel between a client process and a worker of its host (a CPU worker in
this process, no Ray; the client on its own Unix socket): the same answers as direct calls, plans sent
once per connection, errors back to their caller with the connection still serving,
fencing by ticket and epoch, replies to many threads in order, and a closed channel seen
by the calls in flight."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvservice.workers.actor import RayWorker
from kvservice.workers.plan import AttendPlan
from kvservice.workers.wire import PlanEncoder

from kvservice.coordinator_workers import WorkerLost
from kvservice.core.errors import FailedPrecondition, InvalidArgument
from kvservice.ticket_channel import ChannelConnection

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "workers"))
from worker_helpers import LAYOUT, NUM_Q_HEADS, make_seqs  # noqa: E402

pytestmark = pytest.mark.integration

TICKET = 7


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ]
)
def served(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[RayWorker, AttendPlan, ChannelConnection]]:
    # On a GPU worker calls are read into pinned memory and their outputs leave from it.
    gen = torch.Generator().manual_seed(0)
    worker = RayWorker(0, LAYOUT, device=request.param, num_gpu_blocks=32, num_cpu_blocks=8)
    seqs = make_seqs([5, 9, 16], gen)
    for seq in seqs:
        worker.write_kv(0, seq.slots(0, seq.length), seq.k, seq.v)
    worker.open_ticket(TICKET)
    plan = AttendPlan(
        tuple(tuple(s.table) for s in seqs), tuple(s.length for s in seqs), (1, 1, 1), None
    )
    _host, address = worker.channel_address()
    conn = ChannelConnection(address, worker.worker_id)
    yield worker, plan, conn
    conn.close()
    worker.close_channel()


def _q(seed: int, rows: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((rows, NUM_Q_HEADS, LAYOUT.head_dim), generator=gen).to(dtype)


def test_calls_match_direct_calls_and_a_plan_travels_once(served) -> None:
    worker, plan, conn = served
    wire = PlanEncoder().encode(plan)
    for seed in range(3):
        q = _q(seed)
        out = conn.submit(worker.epoch, 0, wire, (q, None, None), TICKET, {}).result()
        assert torch.equal(out, worker.attend(0, plan, q))
    assert wire.key in conn._plans_sent and len(conn._plans_sent) == 1
    out, lse = conn.submit(
        worker.epoch, 0, wire, (_q(9), None, None), TICKET, {"return_lse": True}
    ).result()
    want_out, want_lse = worker.attend(0, plan, _q(9), return_lse=True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    stats = worker.stats()["channel"]
    assert stats["calls"] == 4 and stats["connections"] == 1 and stats["errors"] == 0


def test_errors_reach_their_caller_and_the_connection_carries_on(served) -> None:
    worker, plan, conn = served
    wire = PlanEncoder().encode(plan)
    bad = conn.submit(worker.epoch, 0, wire, (_q(0, rows=2), None, None), TICKET, {})
    wrong_dtype = conn.submit(
        worker.epoch, 0, wire, (_q(0, dtype=torch.float64), None, None), TICKET, {}
    )
    closed = conn.submit(worker.epoch, 0, wire, (_q(0), None, None), TICKET + 1, {})
    good = conn.submit(worker.epoch, 0, wire, (_q(1), None, None), TICKET, {})
    with pytest.raises(InvalidArgument):
        bad.result()
    with pytest.raises(InvalidArgument):
        wrong_dtype.result()
    with pytest.raises(FailedPrecondition, match="closed or was revoked"):
        closed.result()
    assert torch.equal(good.result(), worker.attend(0, plan, _q(1)))
    assert worker.stats()["channel"]["errors"] == 3


def test_a_closed_ticket_and_a_stale_epoch_are_refused(served) -> None:
    worker, plan, conn = served
    wire = PlanEncoder().encode(plan)
    worker.close_ticket(TICKET)
    with pytest.raises(FailedPrecondition):
        conn.submit(worker.epoch, 0, wire, (_q(0), None, None), TICKET, {}).result()
    worker.open_ticket(TICKET)
    with pytest.raises(WorkerLost):  # a call meant for an earlier incarnation
        conn.submit(worker.epoch + 1, 0, wire, (_q(0), None, None), TICKET, {}).result()


def test_a_call_without_a_ticket_is_refused(served) -> None:
    worker, plan, conn = served
    with pytest.raises(InvalidArgument, match="step ticket"):
        conn.submit(worker.epoch, 0, plan, (_q(0), None, None), None, {}).result()  # type: ignore[arg-type]


def test_threads_share_a_connection_and_get_their_own_replies(served) -> None:
    worker, plan, conn = served
    wire = PlanEncoder().encode(plan)
    wants = {seed: worker.attend(0, plan, _q(seed)) for seed in range(8)}
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            for _ in range(10):
                calls = [
                    conn.submit(worker.epoch, 0, wire, (_q(seed), None, None), TICKET, {})
                    for _ in range(3)
                ]
                for call in reversed(calls):  # waited out of order: replies are kept
                    assert torch.equal(call.result(), wants[seed])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert worker.stats()["channel"]["calls"] == 8 * 10 * 3


def test_calls_in_flight_see_a_closed_channel_as_a_lost_worker(served) -> None:
    worker, plan, conn = served
    wire = PlanEncoder().encode(plan)
    assert conn.submit(worker.epoch, 0, wire, (_q(0), None, None), TICKET, {}).result() is not None
    worker.close_channel()
    with pytest.raises(WorkerLost):
        conn.submit(worker.epoch, 0, wire, (_q(0), None, None), TICKET, {}).result()
    assert conn.broken is not None
    with pytest.raises(WorkerLost):  # and every later call, at its result, sending nothing
        conn.submit(worker.epoch, 0, wire, (_q(0), None, None), TICKET, {}).result()


def test_a_broken_frame_ends_only_its_own_connection(served) -> None:
    import socket

    from kvservice.workers.channel_frames import HEADER

    worker, plan, conn = served
    wire = PlanEncoder().encode(plan)
    _host, address = worker.channel_address()
    for garbage in (
        HEADER.pack(9, 0, 0, 0),  # an unknown kind
        HEADER.pack(1, 5, 0, 0) + b"\x80\x04junk",  # meta that does not unpickle
    ):
        rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rogue.connect(address)
        rogue.sendall(garbage)
        rogue.settimeout(30)
        try:  # the worker closes it, replying nothing (a reset when bytes were left unread)
            assert rogue.recv(1) == b""
        except ConnectionResetError:
            pass
        rogue.close()
    out = conn.submit(worker.epoch, 0, wire, (_q(3), None, None), TICKET, {}).result()
    assert torch.equal(out, worker.attend(0, plan, _q(3)))
