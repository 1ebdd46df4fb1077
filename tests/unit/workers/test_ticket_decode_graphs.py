"""When decode graphs are captured: a key is captured on its third call, keys seen less
often are never captured, and the counts stay bounded (the replays themselves need CUDA:
tests/unit/workers/test_worker_cuda.py)."""

from __future__ import annotations

import pytest
from kvservice.workers.decode_graphs import CAPTURE_AFTER, DecodeGraphs, Sightings


def test_a_key_is_captured_once_seen_often_enough() -> None:
    seen = Sightings(size=3)
    assert [seen.see("a") for _ in range(CAPTURE_AFTER)] == list(range(1, CAPTURE_AFTER + 1))
    seen.forget("a")
    assert seen.see("a") == 1  # counted afresh after its capture


def test_sightings_keep_the_most_recent_keys() -> None:
    seen = Sightings(size=2)
    seen.see("a")
    seen.see("b")
    seen.see("a")  # a is now the most recent
    seen.see("c")  # b goes
    assert seen.see("a") == 3
    assert seen.see("b") == 1


def test_a_graph_cache_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        DecodeGraphs(0)
    assert len(DecodeGraphs(2)) == 0


@pytest.mark.parametrize("bad", [-1, True, 1.5, "4"])
def test_a_worker_refuses_a_bad_graph_count_and_a_cpu_one_keeps_none(bad: object) -> None:
    from worker_helpers import make_worker

    from kvservice.core.errors import InvalidArgument

    worker = make_worker()
    with pytest.raises(InvalidArgument, match="decode_graphs"):
        worker.set_decode_graphs(bad)  # type: ignore[arg-type]
    worker.set_decode_graphs(4)  # CPU workers replay no graphs
    assert worker.stats()["decode_graphs"] == {"graphs": 0, "captures": 0, "replays": 0}
