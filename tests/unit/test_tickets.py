"""Step tickets (kvservice.tickets): a step planned once, run by the client on the workers
directly, exact against a dense shadow; revoked (and refused by the workers) whenever a
block it names could move; closing records every layer's writes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from service_fixtures import ATOL, NUM_Q_HEADS, Shadow, make_coordinator

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.core.layout import Layout
from kvservice.tickets import Ticket

LAYOUT = Layout(num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)


class Through:
    """``Shadow.attend`` against a ticket instead of the coordinator."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket

    def attend(
        self, layer: int, seq_ids: Any, q_lens: Any, q: Any, k: Any, v: Any, **kw: Any
    ) -> Any:
        assert list(seq_ids) == self.ticket.seq_ids and list(q_lens) == self.ticket.q_lens
        return self.ticket.attend(layer, q, k, v, **kw)


def setup(lengths: list[int], **options: Any) -> tuple[Coordinator, Shadow, list[int]]:
    coord = make_coordinator(LAYOUT, **options)
    shadow = Shadow(LAYOUT)
    ids = []
    for i, n in enumerate(lengths):
        info = coord.create_sequence([100 * i + t for t in range(n)])
        shadow.prefill(coord, info.seq_id, n, 0)
        ids.append(info.seq_id)
    return coord, shadow, ids


def q_rows(n: int) -> torch.Tensor:
    return torch.randn(n, NUM_Q_HEADS, LAYOUT.head_dim)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_decode_steps_through_tickets_are_exact_and_record_every_layer(num_workers: int) -> None:
    coord, shadow, ids = setup([5, 8, 3, 9], num_workers=num_workers)
    if num_workers == 2:
        assert len({coord.get_sequence(s).worker_id for s in ids}) == 2
    lengths = [5, 8, 3, 9]
    for step in range(5):
        coord.append_tokens(ids, [[step]] * len(ids))
        lengths = [n + 1 for n in lengths]
        ticket = coord.open_ticket(ids, [1] * len(ids))
        assert len(ticket.groups) == num_workers
        for layer in range(LAYOUT.num_layers):
            out, expected = shadow.attend(Through(ticket), layer, ids, [1] * len(ids), lengths)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
        coord.close_ticket(ticket.ticket_id)
        for sid, n in zip(ids, lengths, strict=True):
            assert coord._seqs[sid].written == [n] * LAYOUT.num_layers
    # The coordinator's own path agrees afterwards (it reads what the tickets wrote).
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coord, layer, ids, [1] * len(ids), lengths, write=False)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coord.check_invariants()


def test_a_read_ticket_serves_many_steps_and_needs_every_position_written() -> None:
    coord, shadow, ids = setup([6, 10])
    ticket = coord.open_ticket(ids, [1, 1], writes=False)
    for _ in range(3):
        out, expected = shadow.attend(Through(ticket), 1, ids, [1, 1], [6, 10], write=False)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coord.close_ticket(ticket.ticket_id)
    coord.append_tokens(ids[:1], [[7]])
    with pytest.raises(errors.FailedPrecondition, match="no K/V"):
        coord.open_ticket(ids, [1, 1], writes=False)  # position 6 of the first is unwritten


def test_an_uncommitted_write_ticket_records_nothing() -> None:
    coord, _shadow, ids = setup([6])
    coord.append_tokens(ids, [[1]])
    ticket = coord.open_ticket(ids, [1])
    kv = torch.randn(1, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    ticket.attend(0, q_rows(1), kv, kv)
    coord.close_ticket(ticket.ticket_id, commit=False)
    assert coord._seqs[ids[0]].written == [6] * LAYOUT.num_layers
    with pytest.raises(errors.NotFound):
        coord.close_ticket(ticket.ticket_id + 100)


@pytest.mark.parametrize("change", ["free", "truncate", "offload", "fork_and_write"])
def test_a_change_that_may_move_its_blocks_revokes_the_ticket(change: str) -> None:
    coord, shadow, ids = setup([6, 7], num_cpu_blocks=64)
    other = coord.open_ticket(ids[1:], [1], writes=False)  # names only the second sequence
    ticket = coord.open_ticket(ids[:1], [1], writes=False)
    if change == "free":
        coord.free(ids[:1])
    elif change == "truncate":
        coord.truncate(ids[0], 3)
    elif change == "offload":
        coord.offload(ids[:1])  # swapped out: its GPU blocks are free for others
    else:
        (child,) = coord.fork(ids[0], 1)
        coord.append_tokens([child], [[5]])
        shadow.fork(ids[0], [child])
        # The child writes into the block it shares with the ticket's sequence: copied first.
        shadow.attend(coord, 0, [child], [2], [7])
    with pytest.raises(errors.FailedPrecondition, match="closed or was revoked"):
        ticket.attend(0, q_rows(1))
    with pytest.raises(errors.FailedPrecondition, match="revoked"):
        coord.close_ticket(ticket.ticket_id)
    # The other sequence's ticket was not touched.
    out, expected = shadow.attend(Through(other), 0, ids[1:], [1], [7], write=False)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coord.close_ticket(other.ticket_id)


def test_an_expired_ticket_is_fenced_when_the_next_one_opens() -> None:
    coord, _shadow, ids = setup([4, 5])
    ticket = coord.open_ticket(ids[:1], [1], writes=False, ttl_s=1e-6)
    later = coord.open_ticket(ids[1:], [1], writes=False)
    with pytest.raises(errors.FailedPrecondition, match="closed or was revoked"):
        ticket.attend(0, q_rows(1))
    with pytest.raises(errors.FailedPrecondition, match="expired"):
        coord.close_ticket(ticket.ticket_id)
    later.attend(0, q_rows(1))
    assert coord._tickets.counters["expired"] == 1


def test_bad_tickets_are_refused_and_change_nothing() -> None:
    coord, _shadow, ids = setup([4, 9])
    before = coord._snapshot()
    with pytest.raises(errors.NotFound):
        coord.open_ticket([ids[0], 999], [1, 1])
    with pytest.raises(errors.InvalidArgument):
        coord.open_ticket(ids, [1])
    with pytest.raises(errors.InvalidArgument):
        coord.open_ticket(ids, [1, 1], ttl_s=0)
    with pytest.raises(errors.NotFound):
        coord.open_ticket(ids, [1, 1], tenant="someone-else")
    assert coord._snapshot() == before and len(coord._tickets) == 0
    ticket = coord.open_ticket(ids, [1, 1], writes=False)
    with pytest.raises(errors.InvalidArgument, match=r"q must be \[2"):
        ticket.attend(0, q_rows(3))
    kv = torch.randn(2, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    with pytest.raises(errors.InvalidArgument, match="no k_new"):
        ticket.attend(0, q_rows(2), kv, kv)
    with pytest.raises(errors.NotFound):
        coord.close_ticket(ticket.ticket_id, tenant="someone-else")
    coord.close_ticket(ticket.ticket_id)


def test_a_worker_refuses_calls_under_a_ticket_it_does_not_hold() -> None:
    coord, _shadow, ids = setup([4])
    ticket = coord.open_ticket(ids, [1], writes=False)
    worker = coord._handles[0].worker  # type: ignore[attr-defined]
    plan = ticket.groups[0].plan
    worker.attend(0, plan, q_rows(1), ticket=ticket.ticket_id)
    with pytest.raises(errors.FailedPrecondition):
        worker.attend(0, plan, q_rows(1), ticket=ticket.ticket_id + 1)
    coord.close_ticket(ticket.ticket_id)
    with pytest.raises(errors.FailedPrecondition):
        worker.attend(0, plan, q_rows(1), ticket=ticket.ticket_id)
