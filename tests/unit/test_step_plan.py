"""Plans kept for the layers of a step (kvservice.step_plan): the layers after the first
plan nothing and still give exact results; anything that changes a sequence or moves a
block between two layers makes the next layer plan in full. A random differential test
runs the same calls through a coordinator that never keeps plans."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from service_fixtures import ATOL, Shadow, make_coordinator

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.core.layout import Layout

LAYOUT = Layout(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)


def close(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def count_plans(coord: Coordinator) -> list[int]:
    """A list that grows by one whenever the coordinator plans attention in full."""
    calls: list[int] = []
    manager = coord.manager
    original = manager.prepare_attention

    def counted(seq_ids: Any) -> Any:
        calls.append(1)
        return original(seq_ids)

    manager.prepare_attention = counted  # type: ignore[method-assign]
    return calls


def count_prepared_writes(coord: Coordinator) -> list[int]:
    """A list that grows by one whenever the coordinator asks to make a range writable."""
    calls: list[int] = []
    manager = coord.manager
    original = manager.prepare_write

    def counted(seq_id: int, start: int, end: int) -> Any:
        calls.append(seq_id)
        return original(seq_id, start, end)

    manager.prepare_write = counted  # type: ignore[method-assign]
    return calls


def start(coord: Coordinator, shadow: Shadow, lengths: list[int]) -> list[int]:
    ids = []
    for i, n in enumerate(lengths):
        info = coord.create_sequence([10 * i + t for t in range(n)])
        shadow.prefill(coord, info.seq_id, n, 0)
        ids.append(info.seq_id)
    return ids


def test_one_full_plan_per_step_and_exact_results() -> None:
    coord = make_coordinator(LAYOUT)
    shadow = Shadow(LAYOUT)
    ids = start(coord, shadow, [5, 8, 3])
    lengths = [5, 8, 3]
    plans = count_plans(coord)
    uploads: list[int] = []
    worker = coord._handles[0].worker  # type: ignore[attr-defined]
    upload = worker._upload
    worker._upload = lambda prepared: uploads.append(1) or upload(prepared)
    for step in range(6):
        coord.append_tokens(ids, [[step]] * len(ids))
        lengths = [n + 1 for n in lengths]
        for layer in range(LAYOUT.num_layers):
            close(*shadow.attend(coord, layer, ids, [1] * len(ids), lengths))
        # Every layer written: the prefix cache knows the sequences' full blocks.
        assert [coord.get_sequence(s).num_cached_tokens for s in ids] == lengths
    assert len(plans) == 6
    assert len(uploads) == 6  # the workers checked and uploaded one plan per step too
    coord.check_invariants()


def test_a_swap_between_layers_is_planned_again() -> None:
    coord = make_coordinator(LAYOUT, num_gpu_blocks=8, num_cpu_blocks=32)
    shadow = Shadow(LAYOUT)
    (seq,) = start(coord, shadow, [9])
    plans = count_plans(coord)
    coord.append_tokens([seq], [[1]])
    close(*shadow.attend(coord, 0, [seq], [1], [10]))
    coord.offload([seq])  # swaps it out between two layers
    assert coord.get_sequence(seq).tiers[0] == 1
    for layer in range(1, LAYOUT.num_layers):
        close(*shadow.attend(coord, layer, [seq], [1], [10]))
    assert len(plans) == 2  # layer 0, then layer 1 brings it back; 2 and 3 reuse that
    coord.check_invariants()


def test_free_and_truncate_between_layers_act_at_once() -> None:
    coord = make_coordinator(LAYOUT)
    shadow = Shadow(LAYOUT)
    a, b = start(coord, shadow, [6, 6])
    coord.append_tokens([a, b], [[1], [2]])
    close(*shadow.attend(coord, 0, [a, b], [1, 1], [7, 7]))
    coord.free([b])
    with pytest.raises(errors.NotFound):
        shadow.attend(coord, 1, [a, b], [1, 1], [7, 7])
    close(*shadow.attend(coord, 0, [a], [1], [7]))
    coord.truncate(a, 6)  # and a new token 6: only layer 0 of the old one was written
    shadow.truncate(a, 6)
    coord.append_tokens([a], [[3]])
    for layer in range(1, LAYOUT.num_layers):
        close(*shadow.attend(coord, layer, [a], [1], [7]))
    with pytest.raises(errors.FailedPrecondition, match="layer 0"):
        shadow.attend(coord, 0, [a], [1], [7], write=False)
    coord.check_invariants()


def test_a_layer_left_behind_is_still_refused() -> None:
    coord = make_coordinator(LAYOUT)
    shadow = Shadow(LAYOUT)
    (seq,) = start(coord, shadow, [5])
    coord.append_tokens([seq], [[1]])
    for layer in (0, 1, 3):  # layer 2 skips this step
        close(*shadow.attend(coord, layer, [seq], [1], [6]))
    coord.append_tokens([seq], [[2]])
    close(*shadow.attend(coord, 0, [seq], [1], [7]))
    with pytest.raises(errors.FailedPrecondition, match="layer 2"):
        shadow.attend(coord, 2, [seq], [1], [7])


def test_rewrites_of_private_positions_keep_their_plan() -> None:
    coord = make_coordinator(LAYOUT)
    shadow = Shadow(LAYOUT)
    ids = start(coord, shadow, [6, 7])  # last blocks partial: private, never cached
    plans = count_plans(coord)
    prepared = count_prepared_writes(coord)
    for _ in range(3):
        for layer in range(LAYOUT.num_layers):
            close(*shadow.attend(coord, layer, ids, [1, 1], [6, 7]))  # the last token again
    assert len(plans) == 1
    assert len(prepared) == 2  # one per sequence, for the first layer of the first step
    assert [coord.get_sequence(s).num_cached_tokens for s in ids] == [6, 7]
    coord.check_invariants()


def test_a_rewrite_after_its_blocks_were_cached_and_shared_copies_them() -> None:
    coord = make_coordinator(LAYOUT)
    shadow = Shadow(LAYOUT)
    tokens = list(range(8))  # what ``start`` gives its first sequence, and two more
    (a,) = start(coord, shadow, [6])
    coord.append_tokens([a], [tokens[6:]])
    for layer in range(3):  # layer 3 lags: 6 tokens computed
        close(*shadow.attend(coord, layer, [a], [2], [8]))
    plans = count_plans(coord)
    # Rewrite positions 4..7 (4 and 5 computed) on every layer: one plan for the step.
    close(*shadow.attend(coord, 0, [a], [4], [8]))
    for layer in (3, 1, 2):
        close(*shadow.attend(coord, layer, [a], [4], [8]))
    assert len(plans) == 1
    # Now all 8 are computed: block 1 entered the prefix cache, and b shares it.
    assert coord.get_sequence(a).num_cached_tokens == 8
    info = coord.create_sequence([*tokens, 99])
    assert info.num_cached_tokens == 8
    shadow.share(a, info.seq_id, 8)
    shadow.prefill(coord, info.seq_id, 9, 8)
    # The same rewrite again must copy the shared block, not write into b's K/V.
    plans.clear()
    cow_blocks = coord.stats()["cow_blocks"]
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(coord, layer, [a], [4], [8]))
    assert len(plans) == 1
    assert coord.stats()["cow_blocks"] == cow_blocks + 1
    for layer in range(LAYOUT.num_layers):
        close(*shadow.attend(coord, layer, [info.seq_id], [1], [9]))
    coord.check_invariants()


# ----------------------------------------------------------------------------- differential


class _Run:
    """One coordinator, its shadow, and what every call returned."""

    def __init__(self, keep_plans: bool) -> None:
        self.coord = make_coordinator(LAYOUT, num_gpu_blocks=14, num_cpu_blocks=64)
        self.num_kept = 0
        steps = self.coord._steps
        attend = steps.attend

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = attend(*args, **kwargs) if keep_plans else None
            self.num_kept += result is not None
            return result

        steps.attend = counted  # type: ignore[method-assign]
        self.shadow = Shadow(LAYOUT, seed=1)
        self.log: list[Any] = []

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            if name == "attend":
                out, expected = self.shadow.attend(self.coord, *args, **kwargs)
                close(out, expected)
                result: Any = out
            else:
                result = getattr(self.coord, name)(*args, **kwargs)
                if name == "fork":
                    self.shadow.fork(args[0], result)
                elif name == "truncate":
                    self.shadow.truncate(*args)
        except errors.KVServiceError as exc:
            result = (type(exc).__name__, str(exc))
        self.log.append(result)
        return result


def _random_calls(seed: int, runs: list[_Run]) -> None:
    rng = random.Random(seed)
    live: dict[int, int] = {}  # seq_id -> length

    def both(name: str, *args: Any, **kwargs: Any) -> Any:
        results = [run.call(name, *args, **kwargs) for run in runs]
        first = results[0]
        for other in results[1:]:
            if isinstance(first, torch.Tensor):
                assert torch.equal(first, other)
            else:
                assert first == other, (name, args, first, other)
        return first

    for _ in range(50):
        op = rng.random()
        if op < 0.15 or not live:
            n = rng.randint(1, 10)
            info = both("create_sequence", [rng.randint(0, 50) for _ in range(n)])
            if not isinstance(info, tuple):
                for layer in range(LAYOUT.num_layers):
                    both("attend", layer, [info.seq_id], [n - info.num_cached_tokens], [n])
                live[info.seq_id] = n
        elif op < 0.25:
            sid = rng.choice(list(live))
            children = both("fork", sid, 1)
            if not isinstance(children, tuple):
                live.update({c: live[sid] for c in children})
        elif op < 0.3:
            sid = rng.choice(list(live))
            both("free", [sid])
            live.pop(sid)
        elif op < 0.35:
            sid = rng.choice(list(live))
            length = rng.randint(1, live[sid])
            if both("truncate", sid, length) is None:
                live[sid] = length
        elif op < 0.4:
            both("offload", [rng.choice(list(live))])
        else:
            # A decode step of some sequences; layers in order, one sometimes skipped or
            # interrupted by another call (a fork, a free, an offload) half way through.
            batch = rng.sample(list(live), min(len(live), rng.randint(1, 3)))
            if both("append_tokens", batch, [[7]] * len(batch)) is not None:
                continue
            for sid in batch:
                live[sid] += 1
            for layer in range(LAYOUT.num_layers):
                if rng.random() < 0.1:
                    continue
                if rng.random() < 0.1:
                    both("offload", [rng.choice(batch)])
                both("attend", layer, batch, [1] * len(batch), [live[s] for s in batch])
    for run in runs:
        run.coord.check_invariants()


@pytest.mark.parametrize("seed", range(5))
def test_kept_plans_change_no_result(seed: int) -> None:
    runs = [_Run(keep_plans=True), _Run(keep_plans=False)]
    _random_calls(seed, runs)
    assert len(runs[0].log) == len(runs[1].log)
    kept, full = (run.coord.stats()["swaps"] for run in runs)
    assert kept == full
    assert runs[0].num_kept > 20  # the kept plans were used
