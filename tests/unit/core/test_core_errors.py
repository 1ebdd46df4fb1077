"""Misuse raises the documented error and leaves the state exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvservice.core.commands import CreateResult, PoolSizes
from kvservice.core.errors import DataLoss, InvalidArgument, NotFound
from kvservice.core.layout import Layout
from kvservice.core.manager import KVCacheManager

Make = Callable[..., KVCacheManager]


@pytest.fixture
def busy(make_manager: Make) -> KVCacheManager:
    """Two workers, a live sequence 0 (worker 0), a freed 1, a forked 2 and one on worker 1."""
    m = make_manager(gpu=8, cpu=4, num_workers=2, vocab_size=100, placement="most_free")
    for tokens in ([1, 2, 3, 4, 5], [6, 7], [8, 9, 10]):
        assert isinstance(m.create(None, tokens, worker_id=0), CreateResult)
    m.free(1)
    m.mark_computed(0, 4)
    assert m.fork(0, 1) == [3]
    assert isinstance(m.create("t", [5], worker_id=1), CreateResult)  # seq 4
    return m


MISUSE: list[tuple[str, Callable[[KVCacheManager], Any], type[Exception]]] = [
    ("unknown sequence", lambda m: m.append(99, [1]), NotFound),
    ("freed sequence", lambda m: m.append(1, [1]), NotFound),
    ("negative id", lambda m: m.free(-1), NotFound),
    ("unknown worker", lambda m: m.create(None, [1], worker_id=7), NotFound),
    ("token outside vocab", lambda m: m.append(0, [1, 100]), InvalidArgument),
    ("negative token", lambda m: m.create(None, [3, -1]), InvalidArgument),
    ("token overflowing int64", lambda m: m.create(None, [2**63]), InvalidArgument),
    ("non-int token", lambda m: m.create(None, [1.5]), InvalidArgument),
    ("string tokens", lambda m: m.create(None, "abc"), InvalidArgument),
    ("empty prompt", lambda m: m.create(None, []), InvalidArgument),
    ("bad tenant", lambda m: m.create("", [1]), InvalidArgument),
    ("truncate past the end", lambda m: m.truncate(0, 6), InvalidArgument),
    ("negative truncate", lambda m: m.truncate(0, -1), InvalidArgument),
    ("fork a freed sequence", lambda m: m.fork(1, 2), InvalidArgument),
    ("fork an unknown sequence", lambda m: m.fork(99, 2), NotFound),
    ("fork zero", lambda m: m.fork(0, 0), InvalidArgument),
    ("fork bool", lambda m: m.fork(0, True), InvalidArgument),
    ("write past the end", lambda m: m.prepare_write(0, 0, 6), InvalidArgument),
    ("write backwards", lambda m: m.prepare_write(0, 3, 2), InvalidArgument),
    ("mark past the end", lambda m: m.mark_computed(0, 6), InvalidArgument),
    ("attention over workers", lambda m: m.prepare_attention([0, 4]), InvalidArgument),
    ("attention over nothing", lambda m: m.prepare_attention([]), InvalidArgument),
    ("decode token count", lambda m: m.prepare_decode([0, 2], [1]), InvalidArgument),
    ("decode repeats", lambda m: m.prepare_decode([0, 0], [1, 1]), InvalidArgument),
    ("decode unknown", lambda m: m.prepare_decode([0, 99], [1, 1]), NotFound),
    ("hard pin with ttl", lambda m: m.pin(0, ttl_s=1.0), InvalidArgument),
    ("soft pin without ttl", lambda m: m.pin(0, hard=False), InvalidArgument),
    ("soft pin, negative ttl", lambda m: m.pin(0, hard=False, ttl_s=-1.0), InvalidArgument),
    ("unpin unknown", lambda m: m.unpin(99), NotFound),
    ("offload unknown", lambda m: m.offload([0, 99]), NotFound),
    ("prefetch unknown", lambda m: m.prefetch([99]), NotFound),
    ("add existing worker", lambda m: m.add_worker(0, PoolSizes(4, 0)), InvalidArgument),
    ("add worker, no blocks", lambda m: m.add_worker(5, PoolSizes(0, 0)), InvalidArgument),
    ("remove unknown worker", lambda m: m.remove_worker(9), NotFound),
    ("evict negative", lambda m: m.evict_cached(0, -1), InvalidArgument),
    ("record of unknown", lambda m: m.record(99), NotFound),
]


@pytest.mark.parametrize("call,error", [(c, e) for _, c, e in MISUSE], ids=[n for n, _, _ in MISUSE])
def test_misuse_raises_and_changes_nothing(
    busy: KVCacheManager,
    snap: Callable[[KVCacheManager], Any],
    call: Callable[[KVCacheManager], Any],
    error: type[Exception],
) -> None:
    before = snap(busy)
    with pytest.raises(error):
        call(busy)
    assert snap(busy) == before
    busy.check_invariants()


def test_lost_sequences_raise_data_loss_naming_them(busy: KVCacheManager) -> None:
    assert busy.remove_worker(0) == [0, 2, 3]
    with pytest.raises(DataLoss) as info:
        busy.append(2, [1])
    assert info.value.seq_ids == [2]
    assert busy.free(2) == []  # the caller acknowledges the loss
    with pytest.raises(NotFound):
        busy.sequence(2)
    assert busy.sequence(4).worker_id == 1
    busy.check_invariants()


@pytest.mark.parametrize(
    "options",
    [
        {"high_watermark": 0.5, "low_watermark": 0.6},
        {"low_watermark": 0.0},
        {"vocab_size": 0},
        {"placement": "random"},
        {"eviction": "mru"},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        KVCacheManager(Layout(1, 1, 8), {0: PoolSizes(4, 0)}, **options)
