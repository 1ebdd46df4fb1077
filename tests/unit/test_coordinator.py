"""The coordinator over local CPU workers: attention results against a dense oracle,
prefix caching, copy on write, swapping, tenants, and state left unchanged by failures."""

from __future__ import annotations

import threading

import pytest
import torch
from service_fixtures import ATOL, LAYOUT, NUM_Q_HEADS, Shadow, make_coordinator, make_handles

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.core.ids import Tier


def close(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def test_prefill_then_decode_matches_dense_attention() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    info = coord.create_sequence(list(range(10)))
    assert (info.length, info.num_cached_tokens, info.num_blocks) == (10, 0, 3)
    shadow.prefill(coord, info.seq_id, 10, 0)
    length = 10
    for step in range(6):  # crosses a block boundary at 12
        coord.append_tokens([info.seq_id], [[100 + step]])
        length += 1
        for layer in range(LAYOUT.num_layers):
            close(*shadow.attend(coord, layer, [info.seq_id], [1], [length]))
    got = coord.get_sequence(info.seq_id)
    assert (got.length, got.num_cached_tokens, got.num_blocks) == (16, 16, 4)
    coord.check_invariants()


def test_ragged_batch_of_extend_and_decode_rows() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    prompts = [list(range(5)), list(range(50, 59)), [7]]
    infos = [coord.create_sequence(p) for p in prompts]
    for info in infos:
        shadow.prefill(coord, info.seq_id, info.length, 0)
    ids = [i.seq_id for i in infos]
    coord.append_tokens(ids, [[1, 2, 3], [4], [5, 6]])
    lengths = [8, 10, 3]
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coord, layer, ids, [3, 1, 2], lengths)
        assert out.shape == (6, NUM_Q_HEADS, LAYOUT.head_dim)
        close(out, expected)
    # Attend without new K/V reads what is there.
    out, expected = shadow.attend(coord, 0, ids, [2, 2, 1], lengths, write=False)
    close(out, expected)


def test_write_kv_then_attend_without_new_kv() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    info = coord.create_sequence(list(range(7)))
    k = shadow.randn(7, 2, 16)
    v = shadow.randn(7, 2, 16)
    for layer in range(2):
        coord.write_kv(layer, [info.seq_id], [7], k, v)
        shadow.kv[(info.seq_id, layer)] = {p: (k[p], v[p]) for p in range(7)}
    close(*shadow.attend(coord, 1, [info.seq_id], [7], [7], write=False))
    assert coord.get_sequence(info.seq_id).num_cached_tokens == 7


def test_prefix_cache_learns_a_block_only_once_every_layer_is_written() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    prompt = list(range(9))  # two full blocks of 4, and one token
    a = coord.create_sequence(prompt)
    out, _ = shadow.attend(coord, 0, [a.seq_id], [9], [9])
    assert coord.create_sequence(prompt).num_cached_tokens == 0  # layer 1 not written yet
    shadow.attend(coord, 1, [a.seq_id], [9], [9])
    b = coord.create_sequence(prompt)
    assert b.num_cached_tokens == 8
    assert coord.lookup_prefix(prompt) == {a.worker_id: 8}
    # b computes only its last token and sees a's K/V for the first eight.
    shadow.share(a.seq_id, b.seq_id, 8)
    for layer in range(2):
        close(*shadow.attend(coord, layer, [b.seq_id], [1], [9]))
    # A whole-prompt hit still leaves one token to compute.
    assert coord.create_sequence(prompt[:8]).num_cached_tokens == 4
    stats = coord.stats()["prefix_cache"]
    assert (stats["queries"], stats["hits"], stats["hit_tokens"]) == (4, 2, 12)


def test_fork_shares_blocks_and_copies_on_write() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    parent = coord.create_sequence(list(range(6)))
    shadow.prefill(coord, parent.seq_id, 6, 0)
    used_before = coord.manager.usage()[0][Tier.GPU].used
    children = coord.fork(parent.seq_id, 3)
    assert len(children) == 3 and coord.manager.usage()[0][Tier.GPU].used == used_before
    shadow.fork(parent.seq_id, children)
    family = [parent.seq_id, *children]
    coord.append_tokens(family, [[10], [11], [12], [13]])
    for layer in range(2):  # each writes position 6 of the shared last block: copy on write
        close(*shadow.attend(coord, layer, family, [1, 1, 1, 1], [7, 7, 7, 7]))
    assert coord.stats()["cow_blocks"] >= 3
    coord.free(children[:2])
    close(*shadow.attend(coord, 0, [parent.seq_id, children[2]], [3, 2], [7, 7], write=False))
    coord.check_invariants()


def test_truncate_rolls_back_and_rewrites() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    info = coord.create_sequence(list(range(10)))
    shadow.prefill(coord, info.seq_id, 10, 0)
    coord.truncate(info.seq_id, 5)
    shadow.truncate(info.seq_id, 5)
    got = coord.get_sequence(info.seq_id)
    assert (got.length, got.num_cached_tokens, got.num_blocks) == (5, 5, 2)
    coord.append_tokens([info.seq_id], [[1, 2]])
    for layer in range(2):
        close(*shadow.attend(coord, layer, [info.seq_id], [2], [7]))
    with pytest.raises(errors.FailedPrecondition):
        coord.truncate(info.seq_id, 8)
    coord.truncate(info.seq_id, 0)
    assert coord.get_sequence(info.seq_id).num_blocks == 0


def test_swapping_keeps_every_sequence_correct() -> None:
    # 8 device blocks, 4 sequences of 3 blocks each: they cannot all be resident.
    coord = make_coordinator(num_gpu_blocks=8, num_cpu_blocks=32)
    shadow = Shadow()
    infos = []
    for i in range(4):
        info = coord.create_sequence([i] * 12)
        shadow.prefill(coord, info.seq_id, 12, 0)
        infos.append(info)
    tiers = [coord.get_sequence(i.seq_id).tiers for i in infos]
    assert any(Tier.CPU in t for t in tiers), tiers
    for round_ in range(2):
        for info in infos:  # each attend swaps its sequence back in, others out
            out, expected = shadow.attend(coord, round_, [info.seq_id], [12], [12], write=False)
            close(out, expected)
            assert set(coord.get_sequence(info.seq_id).tiers) == {Tier.GPU}
    swaps = coord.stats()["swaps"]
    assert swaps["out"]["blocks"] > 0 and swaps["in"]["blocks"] > 0
    assert swaps["out"]["bytes"] == swaps["out"]["blocks"] * LAYOUT.block_bytes
    coord.offload([infos[0].seq_id])
    coord.prefetch([infos[0].seq_id])
    coord.check_invariants()


def test_out_of_memory_is_resource_exhausted_and_changes_nothing() -> None:
    coord = make_coordinator(num_gpu_blocks=6, num_cpu_blocks=0)
    a = coord.create_sequence(list(range(9)))  # 3 blocks
    b = coord.create_sequence(list(range(20, 29)))  # 3 blocks
    usage = coord.manager.usage()
    with pytest.raises(errors.ResourceExhausted):
        coord.create_sequence(list(range(100, 105)))
    # All or nothing: a's append fits, b's does not; a is rolled back.
    with pytest.raises(errors.ResourceExhausted):
        coord.append_tokens([a.seq_id, b.seq_id], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert coord.get_sequence(a.seq_id).length == 9
    assert coord.get_sequence(b.seq_id).length == 9
    assert coord.manager.usage() == usage
    coord.check_invariants()


def test_tenants_see_only_their_own_sequences() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    mine = coord.create_sequence(list(range(9)), tenant="alice")
    shadow.prefill(coord, mine.seq_id, 9, 0, tenant="alice")
    with pytest.raises(errors.NotFound) as theirs:
        coord.get_sequence(mine.seq_id, tenant="bob")
    with pytest.raises(errors.NotFound) as missing:
        coord.get_sequence(12345, tenant="bob")
    assert str(theirs.value) == str(missing.value).replace("12345", str(mine.seq_id))
    for call in (
        lambda: coord.append_tokens([mine.seq_id], [[1]]),
        lambda: coord.free([mine.seq_id], tenant="bob"),
        lambda: coord.fork(mine.seq_id, 1, tenant="bob"),
        lambda: coord.attend(0, [mine.seq_id], [1], torch.zeros(1, 4, 16), tenant="bob"),
    ):
        with pytest.raises(errors.NotFound):
            call()
    # Prefixes are shared within a tenant only.
    assert coord.create_sequence(list(range(9)), tenant="bob").num_cached_tokens == 0
    assert coord.create_sequence(list(range(9)), tenant="alice").num_cached_tokens == 8
    assert coord.get_sequence(mine.seq_id, tenant="alice").length == 9


def test_reading_or_writing_positions_without_kv_is_failed_precondition() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    info = coord.create_sequence(list(range(6)))
    with pytest.raises(errors.FailedPrecondition, match="no K/V"):
        shadow.attend(coord, 0, [info.seq_id], [1], [6], write=True)  # would leave a hole
    with pytest.raises(errors.FailedPrecondition, match="no K/V"):
        shadow.attend(coord, 0, [info.seq_id], [6], [6], write=False)
    with pytest.raises(errors.FailedPrecondition, match="6 tokens"):
        shadow.attend(coord, 0, [info.seq_id], [7], [7])
    shadow.prefill(coord, info.seq_id, 6, 0)
    coord.free([info.seq_id])
    with pytest.raises(errors.NotFound):
        shadow.attend(coord, 0, [info.seq_id], [1], [6], write=False)


def _bad_calls(coord, sid: int):  # noqa: ANN001, ANN202 - a table of lambdas
    z = torch.zeros
    return [
        lambda: coord.create_sequence([]),
        lambda: coord.create_sequence([1, -2]),
        lambda: coord.create_sequence([1, 2.5]),
        lambda: coord.create_sequence("abc"),
        lambda: coord.create_sequence([1], tenant=""),
        lambda: coord.append_tokens([sid], [[1], [2]]),
        lambda: coord.append_tokens([sid, sid], [[1], [2]]),
        lambda: coord.append_tokens([sid], [[2**63]]),
        lambda: coord.fork(sid, 0),
        lambda: coord.fork(-1, 1),
        lambda: coord.truncate(sid, -1),
        lambda: coord.attend(2, [sid], [1], z(1, 4, 16), z(1, 2, 16), z(1, 2, 16)),
        lambda: coord.attend(0, [sid], [0], z(0, 4, 16)),
        lambda: coord.attend(0, [sid], [1], z(1, 3, 16), z(1, 2, 16), z(1, 2, 16)),
        lambda: coord.attend(0, [sid], [1], z(2, 4, 16), z(2, 2, 16), z(2, 2, 16)),
        lambda: coord.attend(0, [sid], [1], z(1, 4, 8), z(1, 2, 8), z(1, 2, 8)),
        lambda: coord.attend(0, [sid], [1], z(1, 4, 16, dtype=torch.float16)),
        lambda: coord.attend(0, [sid], [1], z(1, 4, 16), z(1, 2, 16), None),
        lambda: coord.attend(0, [sid], [1], z(1, 4, 16), z(1, 2, 16), z(1, 2, 16), scale=-1.0),
        lambda: coord.attend(0, [sid], [1], z(1, 4, 16), z(1, 2, 16), z(1, 2, 16), sliding_window=0),
        lambda: coord.attend(0, [], [], z(0, 4, 16)),
        lambda: coord.write_kv(0, [sid], [1], z(1, 2, 16), z(1, 2, 16, dtype=torch.float64)),
        lambda: coord.write_kv(0, [sid], [1, 1], z(2, 2, 16), z(2, 2, 16)),
    ]


def test_bad_arguments_are_invalid_argument_and_change_nothing() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    info = coord.create_sequence(list(range(5)))
    shadow.prefill(coord, info.seq_id, 5, 0)
    usage = coord.manager.usage()
    for i, call in enumerate(_bad_calls(coord, info.seq_id)):
        with pytest.raises(errors.InvalidArgument):
            call()
        assert coord.manager.usage() == usage, i
        assert coord.get_sequence(info.seq_id).length == 5, i
    coord.check_invariants()
    close(*shadow.attend(coord, 1, [info.seq_id], [5], [5], write=False))


def test_batch_across_two_workers_comes_back_in_order() -> None:
    coord = make_coordinator(num_workers=2)
    shadow = Shadow()
    infos = [coord.create_sequence([i] * (3 + i)) for i in range(6)]
    assert {i.worker_id for i in infos} == {0, 1}
    for info in infos:
        shadow.prefill(coord, info.seq_id, info.length, 0)
    ids = [i.seq_id for i in infos]
    coord.append_tokens(ids, [[1]] * 6)
    lengths = [i.length + 1 for i in infos]
    for layer in range(2):
        close(*shadow.attend(coord, layer, ids, [1, 2, 1, 2, 1, 2], lengths))
    # lse comes back in batch order too
    q = shadow.randn(6, NUM_Q_HEADS, 16)
    out, lse = coord.attend(0, ids, [1] * 6, q, return_lse=True)
    assert lse.shape == (6, NUM_Q_HEADS)
    for row, sid in enumerate(ids):
        single, single_lse = coord.attend(0, [sid], [1], q[row : row + 1], return_lse=True)
        close(out[row : row + 1], single)
        close(lse[row : row + 1], single_lse)


def test_lost_worker_is_data_loss_for_its_sequences_only() -> None:
    coord = make_coordinator(num_workers=2)
    shadow = Shadow()
    infos = [coord.create_sequence([i] * 5) for i in range(4)]
    for info in infos:
        shadow.prefill(coord, info.seq_id, 5, 0)
    lost = sorted(i.seq_id for i in infos if i.worker_id == 1)
    kept = [i.seq_id for i in infos if i.worker_id == 0]
    assert lost and kept
    coord._handles[1].killed = True
    with pytest.raises(errors.DataLoss) as exc:
        shadow.attend(coord, 0, [lost[0]], [5], [5], write=False)
    assert exc.value.seq_ids == lost
    with pytest.raises(errors.DataLoss):
        coord.get_sequence(lost[0])
    for sid in kept:
        close(*shadow.attend(coord, 1, [sid], [5], [5], write=False))
    coord.free(lost)
    with pytest.raises(errors.NotFound):
        coord.get_sequence(lost[0])
    assert coord.stats()["sequences_live"] == len(kept)
    coord.check_invariants()


def test_metrics_exported_with_their_names() -> None:
    coord = make_coordinator(num_gpu_blocks=8, num_cpu_blocks=16)
    shadow = Shadow()
    for i in range(3):
        info = coord.create_sequence([i] * 12)
        shadow.prefill(coord, info.seq_id, 12, 0)
    text = coord.metrics.render().decode()
    for needle in (
        'kvservice_blocks{state="used",tier="gpu",worker="0"}',
        'kvservice_usage_ratio{tier="cpu",worker="0"}',
        "kvservice_sequences_live 3.0",
        "kvservice_sequences_created_total 3.0",
        'kvservice_swap_blocks_total{direction="out"}',
        'kvservice_rpc_latency_seconds_count{method="attend"} 6.0',
        "kvservice_prefix_cache_queries_total 3.0",
    ):
        assert needle in text, needle
    with pytest.raises(errors.NotFound):
        coord.get_sequence(999)
    assert 'kvservice_rpc_errors_total{code="NOT_FOUND",method="get_sequence"} 1.0' in (
        coord.metrics.render().decode()
    )


def test_closed_coordinator_is_unavailable() -> None:
    coord = make_coordinator()
    hooks: list[str] = []
    coord.add_close_hook(lambda: hooks.append("stopped"))
    coord.close()
    coord.close()
    assert hooks == ["stopped"]
    with pytest.raises(errors.Unavailable):
        coord.create_sequence([1, 2])


def test_recover_rebuilds_every_sequence_from_the_worker_ledgers() -> None:
    handles = make_handles(num_workers=2, num_gpu_blocks=8, num_cpu_blocks=32)
    coord = Coordinator(LAYOUT, handles)
    shadow = Shadow()
    infos = []
    for i in range(4):  # 4 x 3 blocks over 2 x 8: some end up swapped out
        info = coord.create_sequence([i] * 10, tenant=f"t{i % 2}")
        shadow.prefill(coord, info.seq_id, 10, 0, tenant=f"t{i % 2}")
        infos.append(info)
    (child,) = coord.fork(infos[0].seq_id, 1, tenant="t0")
    shadow.fork(infos[0].seq_id, [child])
    coord.free([infos[3].seq_id], tenant="t1")
    live = {info.seq_id: f"t{i % 2}" for i, info in enumerate(infos[:3])} | {child: "t0"}
    before = {sid: coord.get_sequence(sid, tenant=t) for sid, t in live.items()}

    # A new coordinator over the same workers: its tables come from their ledgers.
    again = Coordinator.recover(LAYOUT, handles)
    again.check_invariants()
    assert {sid: again.get_sequence(sid, tenant=t) for sid, t in live.items()} == before
    with pytest.raises(errors.NotFound):
        again.get_sequence(infos[3].seq_id, tenant="t1")
    assert again.create_sequence([0] * 10, tenant="t0").num_cached_tokens == 8
    for sid, tenant in live.items():
        again.append_tokens([sid], [[42]], tenant=tenant)
        for layer in range(LAYOUT.num_layers):
            close(*shadow.attend(again, layer, [sid], [1], [11], tenant=tenant))
    again.check_invariants()


def test_fork_between_layers_of_a_step_copies_before_the_next_write() -> None:
    coord = make_coordinator()
    shadow = Shadow()
    parent = coord.create_sequence(list(range(5)))
    shadow.prefill(coord, parent.seq_id, 5, 0)
    coord.append_tokens([parent.seq_id], [[9]])
    close(*shadow.attend(coord, 0, [parent.seq_id], [1], [6]))  # layer 0 of the step
    (child,) = coord.fork(parent.seq_id, 1)  # shares the half-written last block
    shadow.fork(parent.seq_id, [child])
    close(*shadow.attend(coord, 1, [parent.seq_id], [1], [6]))  # must copy first
    close(*shadow.attend(coord, 1, [child], [1], [6]))
    close(*shadow.attend(coord, 0, [child, parent.seq_id], [2, 2], [6, 6], write=False))
    close(*shadow.attend(coord, 1, [child, parent.seq_id], [6, 6], [6, 6], write=False))
    coord.check_invariants()


def test_many_threads_with_constant_swapping_all_get_exact_results() -> None:
    # 12 device blocks for 6 threads of 2-3 blocks each: every step swaps someone.
    coord = make_coordinator(num_gpu_blocks=12, num_cpu_blocks=64)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            shadow = Shadow(seed=index)
            prompt = [index] * (6 + index)
            info = coord.create_sequence(prompt)
            shadow.prefill(coord, info.seq_id, len(prompt), 0)
            length = len(prompt)
            for step in range(4):
                coord.append_tokens([info.seq_id], [[step]])
                length += 1
                for layer in range(LAYOUT.num_layers):
                    close(*shadow.attend(coord, layer, [info.seq_id], [1], [length]))
                if step == 1:
                    coord.offload([info.seq_id])
            coord.free([info.seq_id])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    coord.check_invariants()
    assert coord.stats()["swaps"]["in"]["blocks"] > 0
    assert all(u[Tier.GPU].used == 0 for u in coord.manager.usage().values())
