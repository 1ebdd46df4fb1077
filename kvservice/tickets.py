"""Step tickets: attention calls that go from the client straight to the workers.

Through ``attend`` every layer of every step passes the coordinator: one process plans,
submits and awaits each call, and with several workers that one process is the limit
(its per-call cost does not shrink as workers are added). A ticket takes the coordinator
off that path. ``Coordinator.open_ticket`` plans a step once (the same checks, copies on
write and swap-ins as an ``attend``) and returns, per worker, the plan and the handle to
call; the client then sends each layer's attention to those workers itself
(``Ticket.attend``), from any thread or process, and ``close_ticket`` ends the step
(recording every layer's writes when it wrote). A read-only ticket (no new K/V) can serve
many steps over sequences that do not grow.

Safety without holding anything: a ticket is *fenced* on its workers. Opening it
registers its id with each worker, and every call through it names the id; a worker
refuses a call for an id it does not hold. Before the coordinator sends any command that
moves, copies or frees a block a ticket names, or frees, truncates, migrates or loses one
of its sequences, it revokes the ticket: the worker drops the id in a call submitted
*before* the command, so a call through the ticket either ran before the command (the
worker runs its calls in order) or is refused (FAILED_PRECONDITION). A revoked ticket
records no writes; the client plans again (a new ticket, or ``attend``).

Tickets expire after ``ttl_s`` (closed on their workers at the next ticket opened), so a
client that vanished leaves nothing behind. The coordinator's lock guards the table.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvservice.coordinator_workers import PendingCall, WorkerLost, resolve_all
from kvservice.core import errors
from kvservice.core.ids import DEFAULT_TENANT
from kvservice.step_plan import frozen_plan

if TYPE_CHECKING:
    from kvservice.coordinator import Coordinator

DEFAULT_TTL_S = 60.0
ENDED_KEPT = 4096  # revoked tickets remembered, so closing one says why it ended


@dataclass(frozen=True, slots=True)
class TicketGroup:
    worker_id: int
    handle: Any  # the worker's handle (a Ray actor handle travels with it)
    rows: list[tuple[int, int]]  # q rows of the batch this worker serves
    plan: Any  # AttendPlan (immutable: workers keep its checked form)


@dataclass(slots=True)
class Ticket:
    """One planned step, to be run by the client: ``attend`` per layer, then close it
    through the coordinator. Picklable: it may be handed to another process."""

    ticket_id: int
    seq_ids: list[int]
    q_lens: list[int]
    writes: bool
    groups: list[TicketGroup]
    num_rows: int

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``Coordinator.attend`` of this step's sequences, sent straight to the workers.
        ``q`` [rows, Hq, D]; ``k_new``/``v_new`` [rows, Hkv, D] exactly when the ticket
        writes. Raises FAILED_PRECONDITION once the ticket is closed or revoked."""
        return self.wait(
            self.submit(layer, q, k_new, v_new, scale=scale, sliding_window=sliding_window,
                        return_lse=return_lse),
            return_lse=return_lse,
        )  # fmt: skip

    def submit(
        self,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        **options: Any,
    ) -> list[PendingCall]:
        """``attend`` without waiting: the calls, one per worker, for ``wait``."""
        if q.dim() != 3 or q.shape[0] != self.num_rows:
            raise errors.InvalidArgument(
                f"q must be [{self.num_rows}, Hq, D], got {tuple(q.shape)}"
            )
        if (k_new is not None) != self.writes or (k_new is None) != (v_new is None):
            what = "k_new and v_new" if self.writes else "no k_new or v_new"
            raise errors.InvalidArgument(f"this ticket takes {what}")
        from kvservice.data_plane import _rows

        calls = []
        for group in self.groups:
            rows = group.rows
            calls.append(
                group.handle.submit_ticket_call(
                    "attend", layer, group.plan, _rows(q, rows), _rows(k_new, rows),
                    _rows(v_new, rows), ticket=self.ticket_id, **options,
                )
            )  # fmt: skip
        return calls

    def wait(self, calls: list[PendingCall], *, return_lse: bool = False) -> Any:
        from kvservice.data_plane import _merge_results

        try:
            results = resolve_all(calls)
        except WorkerLost as exc:
            raise errors.DataLoss(
                f"worker {exc.worker_id} was lost during a step over {self.seq_ids}",
                list(self.seq_ids),
            ) from exc
        groups: list[tuple[int, list[tuple[int, int]], list[int]]] = [
            (g.worker_id, g.rows, []) for g in self.groups
        ]
        return _merge_results(results, groups, self.num_rows, return_lse)


@dataclass(slots=True)
class _Entry:
    ticket: Ticket
    tenant: str
    deadline: float
    starts: list[int]
    versions: list[int]
    # Per worker, the blocks the ticket's plans name.
    blocks: dict[int, frozenset[int]] = field(default_factory=dict)


class TicketTable:
    """The coordinator's live tickets (used under its lock)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self._live: dict[int, _Entry] = {}
        self._by_seq: dict[int, set[int]] = {}
        self.ended: dict[int, str] = {}  # the last revoked tickets: why each ended
        self.counters = {"opened": 0, "closed": 0, "revoked": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._live)

    def new_id(self) -> int:
        return next(self._ids)

    def add(self, entry: _Entry) -> None:
        self._live[entry.ticket.ticket_id] = entry
        for sid in entry.ticket.seq_ids:
            self._by_seq.setdefault(sid, set()).add(entry.ticket.ticket_id)
        self.counters["opened"] += 1

    def take(self, ticket_id: int) -> _Entry | None:
        entry = self._live.pop(ticket_id, None)
        if entry is not None:
            for sid in entry.ticket.seq_ids:
                ids = self._by_seq.get(sid)
                if ids is not None:
                    ids.discard(ticket_id)
                    if not ids:
                        del self._by_seq[sid]
        return entry

    def revoke(self, ticket_id: int, reason: str) -> _Entry | None:
        """``take``, remembering why the ticket ended."""
        entry = self.take(ticket_id)
        if entry is not None:
            self.counters["expired" if reason == "expired" else "revoked"] += 1
            self.ended[ticket_id] = reason
            if len(self.ended) > ENDED_KEPT:
                del self.ended[next(iter(self.ended))]
        return entry

    def naming_blocks(self, worker_id: int, block_ids: Iterable[int]) -> list[int]:
        if not self._live:
            return []
        ids = set(block_ids)
        return [
            tid
            for tid, e in self._live.items()
            if not ids.isdisjoint(e.blocks.get(worker_id, frozenset()))
        ]

    def naming_seqs(self, seq_ids: Iterable[int]) -> list[int]:
        if not self._by_seq:
            return []
        return sorted({tid for sid in seq_ids for tid in self._by_seq.get(sid, ())})

    def on_worker(self, worker_id: int) -> list[int]:
        return [tid for tid, e in self._live.items() if worker_id in e.blocks]

    def expired(self) -> list[int]:
        now = self._clock()
        return [tid for tid, e in self._live.items() if e.deadline <= now]


# ---------------------------------------------------------------------- coordinator side


def open_ticket(
    coord: Coordinator,
    seq_ids: Sequence[int],
    q_lens: Sequence[int],
    *,
    writes: bool = True,
    tenant: str = DEFAULT_TENANT,
    ttl_s: float = DEFAULT_TTL_S,
) -> Ticket:
    from kvservice.arg_checks import check_tenant

    tenant = check_tenant(tenant)
    _layer, ids, lens = coord._check_batch(0, seq_ids, q_lens)
    if not isinstance(writes, bool):
        raise errors.InvalidArgument(f"writes must be a bool, got {writes!r}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s <= 86400:
        raise errors.InvalidArgument(f"ttl_s must be in (0, 86400] seconds, got {ttl_s!r}")
    table = coord._tickets
    with coord._planning() as batch:
        revoke(coord, table.expired(), batch.calls, reason="expired")
        if coord._spans.any_span(ids):
            raise errors.FailedPrecondition(
                "a step over segmented (long) sequences goes through attend, not a ticket"
            )
        starts, versions = coord._check_positions(None, ids, lens, tenant, writes)
        groups = coord._split_by_worker(ids, lens)
        plans = coord._plan_groups(groups, ids, starts if writes else None, lens, batch.calls)
        planned = [
            (wid, rows, frozen_plan(tables, seq_lens, [lens[i] for i in idx]))
            for (wid, rows, idx), (tables, seq_lens) in zip(groups, plans, strict=True)
        ]
        ticket_id = table.new_id()
        ticket = Ticket(
            ticket_id,
            ids,
            lens,
            writes,
            [
                TicketGroup(wid, coord._handles[wid], rows, _sendable(coord._handles[wid], plan))
                for wid, rows, plan in planned
            ],
            sum(lens),
        )
        entry = _Entry(
            ticket, tenant, table._clock() + float(ttl_s), starts, versions,
            {wid: frozenset(b for row in plan.block_tables for b in row) for wid, _r, plan in planned},
        )  # fmt: skip
        for wid, _rows, _plan in planned:
            batch.calls.append(coord._handles[wid].submit("open_ticket", ticket_id))
        table.add(entry)
    return ticket


def close_ticket(
    coord: Coordinator, ticket_id: int, *, commit: bool = True, tenant: str = DEFAULT_TENANT
) -> None:
    """End a ticket. A writing ticket's writes (every layer's, at the new positions) are
    recorded when ``commit``; a ticket already revoked or expired records nothing and is
    FAILED_PRECONDITION (its step must be run again), an unknown one NOT_FOUND."""
    from kvservice.arg_checks import check_tenant

    tenant = check_tenant(tenant)
    table = coord._tickets
    with coord._planning() as batch:
        entry = table._live.get(ticket_id)
        if entry is None or entry.tenant != tenant:
            if ticket_id in table.ended:
                raise errors.FailedPrecondition(
                    f"ticket {ticket_id} was {table.ended[ticket_id]}: run the step again"
                )
            raise errors.NotFound(f"ticket {ticket_id} not found")
        table.take(ticket_id)
        table.counters["closed"] += 1
        _fence(coord, entry, batch.calls)
    if entry.ticket.writes and commit:
        t = entry.ticket
        coord._record_writes(None, t.seq_ids, entry.starts, t.q_lens, entry.versions)


def _sendable(handle: Any, plan: Any) -> Any:
    """A Ray worker's plan in its wire form, encoded once here: every copy of the ticket
    (one per client process) then sends the same key, and the worker decodes, checks and
    uploads the plan once, not once per copy."""
    encoder = getattr(handle, "_plans", None)
    return plan if encoder is None else encoder.encode(plan)


def revoke(
    coord: Coordinator, ticket_ids: Iterable[int], calls: list[PendingCall], *, reason: str
) -> None:
    """Drop tickets (under the lock), their fences submitted to ``calls`` now: before any
    command the caller submits after this."""
    for tid in ticket_ids:
        entry = coord._tickets.revoke(tid, reason)
        if entry is not None:
            _fence(coord, entry, calls)


def _fence(coord: Coordinator, entry: _Entry, calls: list[PendingCall]) -> None:
    for wid in entry.blocks:
        handle = coord._handles.get(wid)
        if handle is not None:
            calls.append(handle.submit("close_ticket", entry.ticket.ticket_id))
