"""Leases: sequences idle past their TTL are freed by the reaper and counted in metrics.

A LeasedService over a coordinator with local CPU workers and a fake clock, so every
expiry is exact; one test runs the real reaper thread with a short TTL.
"""

from __future__ import annotations

import time

import pytest
import torch
from service_fixtures import ATOL, Shadow, make_coordinator

from kvservice.core import errors
from kvservice.housekeeping import Housekeeper
from kvservice.leases import LeasedService


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leased(ttl_s: float | None = 10.0) -> tuple[LeasedService, Clock]:
    clock = Clock()
    return LeasedService(make_coordinator(), ttl_s=ttl_s, reap_interval_s=None, clock=clock), clock


def used_blocks(service: LeasedService) -> int:
    return sum(u.used for tiers in service.manager.usage().values() for u in tiers.values())


def expired_metric(service: LeasedService) -> float:
    value = service.metrics.registry.get_sample_value("kvservice_leases_expired_total")
    return 0.0 if value is None else value


def test_an_idle_sequence_is_freed_and_counted_and_a_used_one_lives_on() -> None:
    service, clock = leased(ttl_s=10.0)
    shadow = Shadow()
    idle = service.create_sequence(list(range(9)))
    busy = service.create_sequence(list(range(100, 109)))
    for info in (idle, busy):
        shadow.prefill(service, info.seq_id, 9, 0)
    length = 9
    reaped: list[list[int]] = []
    for _ in range(5):  # 5 steps 4 s apart: 20 s, twice the TTL, every one a renewal
        clock.now += 4.0
        reaped.append(service.reap())
        service.append_tokens([busy.seq_id], [[7]])
        length += 1
        for layer in range(2):
            out, expected = shadow.attend(service, layer, [busy.seq_id], [1], [length])
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert reaped == [[], [], [idle.seq_id], [], []]  # idle since 1000, ttl 10: gone at 1012
    with pytest.raises(errors.NotFound):
        service.get_sequence(idle.seq_id)
    assert expired_metric(service) == 1
    assert service.stats()["leases"] == {"active": 1, "expired": 1, "default_ttl_s": 10.0}
    assert service.metrics.registry.get_sample_value("kvservice_leases_active") == 1
    # The busy one expires too once left alone; then every block is back.
    clock.now += 10.0
    assert service.reap() == [busy.seq_id]
    assert used_blocks(service) == 0 and expired_metric(service) == 2
    service.check_invariants()


def test_only_the_owner_renews_and_children_inherit_the_lease() -> None:
    service, clock = leased(ttl_s=5.0)
    mine = service.create_sequence(list(range(6)), tenant="alice")
    clock.now += 4.0
    with pytest.raises(errors.NotFound):  # bob naming it renews nothing
        service.get_sequence(mine.seq_id, tenant="bob")
    children = service.fork(mine.seq_id, 2, tenant="alice")  # renews the parent too
    clock.now += 4.0
    assert service.reap() == []
    service.get_sequence(children[0], tenant="alice")
    clock.now += 2.0
    assert sorted(service.reap()) == [mine.seq_id, children[1]]
    clock.now += 3.0
    assert service.reap() == [children[0]]
    assert used_blocks(service) == 0


def test_free_ends_the_lease_and_sequences_without_one_stay() -> None:
    service, clock = leased(ttl_s=None)
    kept = service.create_sequence([1, 2, 3])
    short = service.create_sequence([4, 5, 6], ttl_s=1.0)
    freed = service.create_sequence([7, 8, 9], ttl_s=1.0)
    service.free([freed.seq_id])
    clock.now += 3600.0
    assert service.reap() == [short.seq_id]
    assert service.get_sequence(kept.seq_id).length == 3
    assert expired_metric(service) == 1
    with pytest.raises(errors.InvalidArgument):
        service.create_sequence([1], ttl_s=0)
    with pytest.raises(errors.InvalidArgument):
        service.create_sequence([1], ttl_s=float("nan"))


def test_a_sequence_freed_by_its_owner_after_expiry_is_not_counted() -> None:
    service, clock = leased(ttl_s=1.0)
    info = service.create_sequence([1, 2, 3])
    clock.now += 2.0
    service.service.free([info.seq_id])  # behind the lease table's back
    assert service.reap() == []
    assert expired_metric(service) == 0


def test_the_reaper_thread_frees_abandoned_sequences() -> None:
    service = LeasedService(make_coordinator(), ttl_s=0.2, reap_interval_s=0.05)
    try:
        for i in range(3):
            service.create_sequence(list(range(i, i + 9)))
        assert used_blocks(service) > 0
        deadline = time.monotonic() + 10.0
        while used_blocks(service) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used_blocks(service) == 0 and expired_metric(service) == 3
    finally:
        service.close()


def test_housekeeping_keeps_running_after_a_job_fails() -> None:
    rounds: list[int] = []

    def flaky() -> None:
        rounds.append(len(rounds))
        if len(rounds) % 2:
            raise RuntimeError("one bad round")

    keeper = Housekeeper(0.01, [flaky]).start()
    try:
        deadline = time.monotonic() + 10.0
        while len(rounds) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        keeper.stop()
    assert len(rounds) >= 4
    with pytest.raises(errors.InvalidArgument):
        Housekeeper(0, [flaky])
