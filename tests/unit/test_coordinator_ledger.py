"""The coordinator's ledger updates: records the workers hold change by deltas, and a
coordinator recovered from those ledgers finds every sequence as it was."""

from __future__ import annotations

from service_fixtures import LAYOUT, Shadow, make_handles

from kvservice.coordinator import Coordinator
from kvservice.core.ids import Tier


def _ledger_records(handles):  # noqa: ANN001, ANN202
    return {h.worker_id: h.worker.ledger().records for h in handles}


def _check_ledgers(coord, handles) -> None:  # noqa: ANN001
    """Every record a worker holds is the one the manager would send whole now (after a
    call that sends the ledger updates)."""
    for wid, records in _ledger_records(handles).items():
        for sid, record in records.items():
            assert record == coord.manager.record(sid), (wid, sid)


def _spy_deltas(handles) -> list[int]:  # noqa: ANN001
    """Counts sequences sent as deltas (a list the test reads)."""
    sent: list[int] = []
    for h in handles:
        update = h.worker.update_ledger

        def spy(upserts, deletes=(), delta=None, _update=update):  # noqa: ANN001, ANN202
            sent.append(len(delta) if delta is not None else 0)
            return _update(upserts, deletes, delta)

        h.worker.update_ledger = spy
    return sent


def test_deltas_keep_every_ledger_record_whole_through_fork_truncate_cow_and_swap() -> None:
    # 18 device blocks: the fourth sequence pushes others to the host tier.
    handles = make_handles(num_gpu_blocks=18, num_cpu_blocks=32)
    coord = Coordinator(LAYOUT, handles)
    shadow = Shadow()
    sent = _spy_deltas(handles)
    a = coord.create_sequence(list(range(10))).seq_id
    shadow.prefill(coord, a, 10, 0)
    (b,) = coord.fork(a, 1)  # shares every block: the next write copies on write
    shadow.fork(a, [b])
    c = coord.create_sequence([7] * 9).seq_id
    shadow.prefill(coord, c, 9, 0)
    for step in range(7):  # decode: one token each, crossing block boundaries
        coord.append_tokens([a, b, c], [[step], [step + 1], [step + 2]])
        _check_ledgers(coord, handles)
        for layer in range(LAYOUT.num_layers):
            shadow.attend(coord, layer, [a, b, c], [1, 1, 1], [11 + step, 11 + step, 10 + step])
        # (new prefix hashes reach the ledgers with the next call that allocates)
    coord.truncate(b, 12)
    _check_ledgers(coord, handles)
    coord.append_tokens([b], [[99, 98]])
    _check_ledgers(coord, handles)
    d = coord.create_sequence([3] * 20).seq_id  # pushes others to the host tier
    coord.offload([a])
    assert Tier.CPU in coord.get_sequence(a).tiers
    _check_ledgers(coord, handles)
    coord.append_tokens([a, d], [[1], [2]])  # a swaps back in to grow
    _check_ledgers(coord, handles)
    assert sum(sent) > 0, "no delta was sent"
    live = [a, b, c, d]
    before = {sid: coord.get_sequence(sid) for sid in live}
    again = Coordinator.recover(LAYOUT, handles)
    again.check_invariants()
    assert {sid: again.get_sequence(sid) for sid in live} == before
    for sid in live:
        assert again.manager.sequence(sid) == coord.manager.sequence(sid)
