"""Sequences longer than a worker's GPU tier, and than a worker: segments paged between
tiers and spread over workers, attention checked against dense attention over the whole
K/V (``Shadow``), bookkeeping checked after every step."""

from __future__ import annotations

import time

import pytest
import torch
from service_fixtures import ATOL, LAYOUT, NUM_Q_HEADS, Shadow, make_handles

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.core.ids import Tier
from kvservice.span_attention import merge_partials

SEGMENT = 8  # tokens: two blocks of 4


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def coordinator(handles: list, **options: object) -> Coordinator:
    return Coordinator(LAYOUT, handles, segment_tokens=SEGMENT, **options)  # type: ignore[arg-type]


def grow(coord: Coordinator, shadow: Shadow, sid: int, length: int, target: int, chunk: int) -> int:
    """Append and compute tokens ``chunk`` at a time (as a chunked prefill does) up to
    ``target``, checking every layer's output; returns the new length."""
    while length < target:
        n = min(chunk, target - length)
        coord.append_tokens([sid], [list(range(length, length + n))])
        length += n
        for layer in range(LAYOUT.num_layers):
            close(*shadow.attend(coord, layer, [sid], [n], [length]))
        coord.check_invariants()
    return length


def windowed(
    shadow: Shadow, sid: int, layer: int, q: torch.Tensor, length: int, window: int
) -> torch.Tensor:
    """Dense attention of the last len(q) positions with a sliding window."""
    rows = shadow.kv[(sid, layer)]
    k = torch.stack([rows[p][0] for p in range(length)]).repeat_interleave(2, dim=1)
    v = torch.stack([rows[p][1] for p in range(length)]).repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * LAYOUT.head_dim**-0.5
    pos = torch.arange(length - q.shape[0], length)[:, None]
    keys = torch.arange(length)[None, :]
    scores = scores.masked_fill((keys > pos) | (keys <= pos - window), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def segments(coord: Coordinator, sid: int) -> list:
    info = coord.get_sequence(sid)
    return coord._spans.segments(sid, info.worker_id, info.length)


def test_a_sequence_twice_the_gpu_tier_pages_its_cold_segments_and_attends_exactly() -> None:
    handles = make_handles(num_gpu_blocks=16, num_cpu_blocks=48)  # 64 tokens on the GPU
    coord = coordinator(handles)
    shadow = Shadow()
    sid = coord.create_sequence(list(range(12))).seq_id
    shadow.prefill(coord, sid, 12, 0)
    length = grow(coord, shadow, sid, 12, 128, chunk=11)  # chunks cross segment edges
    # K/V written on its own (write_kv), then attention without new K/V.
    coord.append_tokens([sid], [[1, 2, 3]])
    length += 3
    for layer in range(LAYOUT.num_layers):
        k, v = shadow.randn(3, 2, LAYOUT.head_dim), shadow.randn(3, 2, LAYOUT.head_dim)
        coord.write_kv(layer, [sid], [3], k, v)
        rows = shadow.kv[(sid, layer)]
        rows.update({length - 3 + i: (k[i], v[i]) for i in range(3)})
        close(*shadow.attend(coord, layer, [sid], [2], [length], write=False))
    other = coord.create_sequence(list(range(5))).seq_id  # a plain one beside it
    shadow.prefill(coord, other, 5, 0)
    lengths = [length, 5]
    for _ in range(3):  # decode steps of a mixed batch
        coord.append_tokens([sid, other], [[7], [8]])
        lengths = [n + 1 for n in lengths]
        for layer in range(LAYOUT.num_layers):
            close(*shadow.attend(coord, layer, [sid, other], [1, 1], lengths))
    coord.check_invariants()

    info = coord.get_sequence(sid)
    assert info.length == 134 and info.num_blocks == 34 and info.num_cached_tokens == 134
    assert Tier.CPU in info.tiers and info.tiers[:2] == (Tier.GPU, Tier.GPU)  # sinks stay hot
    assert info.tiers[-1] == Tier.GPU
    stats = coord.stats()
    long = stats["long_sequences"]
    assert long["count"] == 1 and long["bytes"]["cold"] > 0 and long["bytes"]["hot"] > 0
    assert long["attention_read_bytes"]["cold"] > 0
    assert stats["workers"]["0"]["worker"]["tiered"]["cold_blocks"] > 0
    assert "kvservice_long_sequence_bytes" in coord.metrics.render().decode()


def test_a_sequence_longer_than_a_worker_spans_two_and_merges_their_parts() -> None:
    handles = make_handles(num_workers=2, num_gpu_blocks=8, num_cpu_blocks=8)  # 64 tokens each
    coord = coordinator(handles)
    shadow = Shadow()
    sid = coord.create_sequence(list(range(10))).seq_id
    shadow.prefill(coord, sid, 10, 0)
    length = grow(coord, shadow, sid, 10, 100, chunk=13)
    workers = {s.worker_id for s in segments(coord, sid)}
    assert workers == {0, 1}
    for _ in range(2):
        coord.append_tokens([sid], [[3]])
        length += 1
        for layer in range(LAYOUT.num_layers):
            out, want = shadow.attend(coord, layer, [sid], [1], [length], return_lse=True)
            close(out[0], want)
    coord.check_invariants()
    # A sliding window reaching segments on both workers is refused, not miscomputed.
    segs = segments(coord, sid)
    edge = next(i for i in range(1, len(segs)) if segs[i].worker_id != segs[i - 1].worker_id)
    cut = segs[edge].start + 2
    coord.truncate(sid, cut)
    shadow.truncate(sid, cut)
    with pytest.raises(errors.FailedPrecondition, match="several workers"):
        shadow.attend(coord, 0, [sid], [1], [cut], write=False, sliding_window=6)
    coord.free([sid])
    coord.check_invariants()
    used = coord.stats()["workers"]
    assert all(w["tiers"][t]["used"] == 0 for w in used.values() for t in ("gpu", "cpu"))


def test_fork_truncate_window_and_recovery_of_a_long_sequence() -> None:
    handles = make_handles(num_gpu_blocks=16, num_cpu_blocks=48)
    coord = coordinator(handles)
    shadow = Shadow()
    sid = coord.create_sequence(list(range(8))).seq_id
    shadow.prefill(coord, sid, 8, 0)
    length = grow(coord, shadow, sid, 8, 60, chunk=9)
    (child,) = coord.fork(sid, 1)
    shadow.fork(sid, [child])
    coord.append_tokens([sid, child], [[1, 2, 3], [4]])
    lengths = [length + 3, length + 1]
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(coord, layer, [sid, child], [3, 1], lengths))
    coord.check_invariants()

    coord.truncate(sid, 29)  # into an earlier segment; the child keeps its own
    shadow.truncate(sid, 29)
    grow(coord, shadow, sid, 29, 41, chunk=5)
    for layer in range(LAYOUT.num_layers):
        q = shadow.randn(3, NUM_Q_HEADS, LAYOUT.head_dim)
        out = coord.attend(layer, [sid], [3], q, sliding_window=5)
        close(out, windowed(shadow, sid, layer, q, 41, 5))

    # Computed counts reach the ledgers with the next call that allocates (this one).
    coord.free([coord.create_sequence([1]).seq_id])
    before = {s: coord.get_sequence(s) for s in (sid, child)}
    again = Coordinator.recover(LAYOUT, handles, segment_tokens=SEGMENT)
    again.check_invariants()
    assert {s: again.get_sequence(s) for s in (sid, child)} == before
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(again, layer, [sid, child], [1, 1], [41, lengths[1]], write=False))
    again.free([sid, child])
    again.check_invariants()
    assert again.stats()["long_sequences"]["count"] == 0


def test_hints_move_segments_and_a_lost_worker_loses_the_whole_sequence() -> None:
    handles = make_handles(num_workers=2, num_gpu_blocks=8, num_cpu_blocks=8)
    coord = coordinator(handles)
    shadow = Shadow()
    sid = coord.create_sequence(list(range(8))).seq_id
    shadow.prefill(coord, sid, 8, 0)
    length = grow(coord, shadow, sid, 8, 24, chunk=8)
    coord.offload([sid])
    assert set(coord.get_sequence(sid).tiers) == {Tier.CPU}
    coord.prefetch([sid])
    assert set(coord.get_sequence(sid).tiers) == {Tier.GPU}
    length = grow(coord, shadow, sid, length, 100, chunk=10)
    assert {s.worker_id for s in segments(coord, sid)} == {0, 1}
    other = coord.create_sequence(list(range(4))).seq_id
    other_survives = coord.get_sequence(other).worker_id == 0

    handles[1].killed = True
    with pytest.raises(errors.DataLoss) as lost:
        shadow.attend(coord, 0, [sid], [1], [length], write=False)
    assert sid in lost.value.seq_ids
    with pytest.raises(errors.DataLoss):
        coord.get_sequence(sid)
    coord.free([sid])
    if other_survives:
        coord.get_sequence(other)
    else:
        with pytest.raises(errors.DataLoss):
            coord.get_sequence(other)
    coord.check_invariants()
    tiers = coord.stats()["workers"]["0"]["tiers"]
    assert tiers["gpu"]["used"] == int(other_survives) and tiers["cpu"]["used"] == 0


def test_merge_partials_is_the_log_sum_exp_mix() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, 2, generator=gen)  # 3 rows, 5 keys, 2 heads
    values = torch.randn(5, 2, 4, generator=gen)
    parts = [(0, [0, 1]), (0, [2, 3, 4]), (1, [0, 1, 2, 3, 4]), (2, [3]), (2, [])]
    dest, outs, lses = [], [], []
    for row, keys in parts:
        s = scores[row, keys]  # [k, H]
        lse = torch.logsumexp(s, 0) if keys else torch.full((2,), float("-inf"))
        out = (
            torch.einsum("kh,khd->hd", torch.softmax(s, 0), values[keys])
            if keys
            else torch.zeros(2, 4)
        )
        dest.append(row)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_partials(torch.tensor(dest), torch.stack(outs), torch.stack(lses), 4)
    keys = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [3]]
    for row in range(3):
        s = scores[row, keys[row]]
        close(lse[row], torch.logsumexp(s, 0))
        close(out[row], torch.einsum("kh,khd->hd", torch.softmax(s, 0), values[keys[row]]))
    assert torch.isinf(lse[3]).all() and (out[3] == 0).all()  # a row with no part


def test_pins_keep_a_long_sequences_first_segment_in_place() -> None:
    coord = coordinator(make_handles(num_gpu_blocks=16, num_cpu_blocks=48))
    shadow = Shadow()
    sid = coord.create_sequence(list(range(8))).seq_id
    shadow.prefill(coord, sid, 8, 0)
    grow(coord, shadow, sid, 8, 40, chunk=16)

    coord.pin(sid)  # hard: the first segment (sinks, system prompt) stays on the GPU
    coord.offload([sid])
    tiers = coord.get_sequence(sid).tiers
    assert tiers[:2] == (Tier.GPU, Tier.GPU) and set(tiers[2:]) == {Tier.CPU}
    coord.unpin(sid)
    coord.offload([sid])
    assert set(coord.get_sequence(sid).tiers) == {Tier.CPU}

    coord.prefetch([sid])
    coord.pin(sid, hard=False, ttl_s=0.05)  # soft: ends by itself
    time.sleep(0.1)
    coord.offload([sid])
    assert set(coord.get_sequence(sid).tiers) == {Tier.CPU}
    with pytest.raises(errors.InvalidArgument):
        coord.pin(sid, hard=True, ttl_s=1.0)

    coord.prefetch([sid])
    coord.pin(sid)  # a hard pin outlives free: its blocks stay until unpin
    coord.free([sid])
    gpu = coord.stats()["workers"]["0"]["tiers"]["gpu"]
    assert gpu["used"] == 2
    with pytest.raises(errors.NotFound):
        coord.unpin(sid, tenant="someone else")
    coord.unpin(sid)
    assert coord.stats()["workers"]["0"]["tiers"]["gpu"]["used"] == 0
    coord.check_invariants()


def test_recovery_without_a_worker_that_held_a_segment_is_data_loss() -> None:
    handles = make_handles(num_workers=2, num_gpu_blocks=8, num_cpu_blocks=8)
    coord = coordinator(handles)
    shadow = Shadow()
    sid = coord.create_sequence(list(range(8))).seq_id
    shadow.prefill(coord, sid, 8, 0)
    grow(coord, shadow, sid, 8, 100, chunk=16)
    assert {s.worker_id for s in segments(coord, sid)} == {0, 1}
    first = segments(coord, sid)[0].worker_id
    survivor = [h for h in handles if h.worker_id == first]

    again = Coordinator.recover(LAYOUT, survivor, segment_tokens=SEGMENT)
    with pytest.raises(errors.DataLoss):
        again.get_sequence(sid)
    again.free([sid])
    again.check_invariants()
    tiers = again.stats()["workers"][str(first)]["tiers"]
    assert tiers["gpu"]["used"] == 0 and tiers["cpu"]["used"] == 0
