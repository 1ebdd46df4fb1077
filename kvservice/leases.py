"""Leases: a sequence nobody uses for its TTL is freed.

``LeasedService`` wraps a service (a Coordinator) with the same API. A sequence created
through it holds a lease of ``ttl_s`` seconds (the service's default, or the one given
to ``create_sequence``; None: no lease, it lives until freed); fork children get their
parent's TTL. Every call that names a sequence renews its lease, for the tenant that
owns it only (naming another tenant's id renews nothing, and is NOT_FOUND as before);
free ends it. ``reap()`` frees the sequences whose lease ran out, and a reaper thread
(``kvservice.housekeeping``) calls it every ``reap_interval_s``. So a client that crashed, lost its connection or
simply forgot never pins blocks forever.

An expired lease is gone: the reaper takes it out of the table before freeing, and a
call that renews after that renews nothing; the sequence answers NOT_FOUND from then
on. Calls already planned on it finish first (the coordinator serializes planning).

Metrics (on the wrapped coordinator's registry, so they are scraped with the rest):
``kvservice_leases_active`` (gauge: sequences holding a lease) and
``kvservice_leases_expired_total`` (counter: sequences freed because their lease ran
out). ``stats()`` reports both under "leases".
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvservice.api import DEFAULT_TENANT, SequenceInfo
from kvservice.core.errors import InvalidArgument, NotFound
from kvservice.housekeeping import Housekeeper

log = logging.getLogger(__name__)

DEFAULT_REAP_INTERVAL_S = 1.0


def check_ttl(ttl_s: object) -> float | None:
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s) or ttl_s <= 0:
        raise InvalidArgument(f"a lease TTL must be a positive number of seconds, got {ttl_s!r}")
    return float(ttl_s)


@dataclass(slots=True)
class Lease:
    tenant: str
    ttl_s: float
    deadline: float


class LeaseTable:
    """seq_id -> Lease, thread safe; times come from ``clock`` (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, seq_id: int) -> Lease | None:
        return self._leases.get(seq_id)

    def grant(self, seq_ids: Iterable[int], tenant: str, ttl_s: float) -> None:
        deadline = self._clock() + ttl_s
        with self._lock:
            for seq_id in seq_ids:
                self._leases[int(seq_id)] = Lease(tenant, ttl_s, deadline)

    def renew(self, seq_ids: Iterable[int], tenant: str) -> None:
        """Push the deadlines of the tenant's own sequences among ``seq_ids``."""
        now = self._clock()
        with self._lock:
            for seq_id in seq_ids:
                lease = self._leases.get(seq_id) if isinstance(seq_id, int) else None
                if lease is not None and lease.tenant == tenant:
                    lease.deadline = now + lease.ttl_s

    def release(self, seq_ids: Iterable[int], tenant: str) -> None:
        with self._lock:
            for seq_id in seq_ids:
                lease = self._leases.get(seq_id) if isinstance(seq_id, int) else None
                if lease is not None and lease.tenant == tenant:
                    del self._leases[seq_id]

    def take_expired(self) -> dict[str, list[int]]:
        """Remove the leases that ran out; their sequences by tenant."""
        now = self._clock()
        expired: dict[str, list[int]] = {}
        with self._lock:
            for seq_id, lease in list(self._leases.items()):
                if lease.deadline <= now:
                    del self._leases[seq_id]
                    expired.setdefault(lease.tenant, []).append(seq_id)
        return expired


class LeasedService:
    """``service`` with leases on its sequences (see the module docstring).

    ``ttl_s``: the default TTL of new sequences (None: only those created with a TTL
    hold a lease). ``reap_interval_s``: start a reaper thread (None: call ``reap``).
    """

    def __init__(
        self,
        service: Any,
        *,
        ttl_s: float | None = None,
        reap_interval_s: float | None = DEFAULT_REAP_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._service = service
        self.default_ttl_s = check_ttl(ttl_s)
        self.leases = LeaseTable(clock)
        metrics = getattr(service, "metrics", None)
        registry = registry or getattr(metrics, "registry", None) or CollectorRegistry()
        self.expired_total = Counter(
            "kvservice_leases_expired", "Sequences freed because their lease ran out", registry=registry
        )
        self.active = Gauge("kvservice_leases_active", "Sequences holding a lease", registry=registry)
        self.active.set_function(lambda: len(self.leases))
        self._num_expired = 0
        self._reaper: Housekeeper | None = None
        if reap_interval_s is not None:
            self._reaper = Housekeeper(reap_interval_s, [self.reap], name="kvservice-lease-reaper")
            self._reaper.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    @property
    def service(self) -> Any:
        return self._service

    # ------------------------------------------------------------------ reaping

    def reap(self) -> list[int]:
        """Free every sequence whose lease ran out; returns their ids."""
        freed: list[int] = []
        for tenant, seq_ids in self.leases.take_expired().items():
            for seq_id in seq_ids:  # one by one: one already gone must not keep the rest
                try:
                    self._service.free([seq_id], tenant=tenant)
                except NotFound:
                    continue  # freed by its owner meanwhile
                freed.append(seq_id)
        if freed:
            self._num_expired += len(freed)
            self.expired_total.inc(len(freed))
            log.info("leases ran out: freed sequences %s", freed)
        return freed

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.stop()
        self._service.close()

    # ------------------------------------------------------------------ the service API

    def _renewing(self, seq_ids: Iterable[Any], tenant: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        finally:
            self.leases.renew(_ids(seq_ids), tenant or DEFAULT_TENANT)

    def layout(self) -> Any:
        return self._service.layout()

    def create_sequence(
        self, tokens: Sequence[int], *, tenant: str = DEFAULT_TENANT, ttl_s: float | None = None
    ) -> SequenceInfo:
        ttl = check_ttl(ttl_s) if ttl_s is not None else self.default_ttl_s
        info = self._service.create_sequence(tokens, tenant=tenant)
        if ttl is not None:
            self.leases.grant([info.seq_id], tenant or DEFAULT_TENANT, ttl)
        return info

    def fork(self, seq_id: int, n: int, *, tenant: str = DEFAULT_TENANT) -> list[int]:
        children = self._renewing([seq_id], tenant, lambda: self._service.fork(seq_id, n, tenant=tenant))
        lease = self.leases.get(seq_id)
        if lease is not None and lease.tenant == (tenant or DEFAULT_TENANT):
            self.leases.grant(children, lease.tenant, lease.ttl_s)
        return children

    def free(self, seq_ids: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> None:
        self._service.free(seq_ids, tenant=tenant)
        self.leases.release(_ids(seq_ids), tenant or DEFAULT_TENANT)

    def append_tokens(
        self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]], *, tenant: str = DEFAULT_TENANT
    ) -> None:
        self._renewing(seq_ids, tenant, lambda: self._service.append_tokens(seq_ids, tokens, tenant=tenant))

    def truncate(self, seq_id: int, length: int, *, tenant: str = DEFAULT_TENANT) -> None:
        self._renewing([seq_id], tenant, lambda: self._service.truncate(seq_id, length, tenant=tenant))

    def write_kv(self, layer: int, seq_ids: Sequence[int], q_lens: Sequence[int], k: Any, v: Any, *,
                 tenant: str = DEFAULT_TENANT) -> None:  # fmt: skip
        self._renewing(
            seq_ids, tenant, lambda: self._service.write_kv(layer, seq_ids, q_lens, k, v, tenant=tenant)
        )

    def attend(self, layer: int, seq_ids: Sequence[int], q_lens: Sequence[int], q: Any,
               k_new: Any = None, v_new: Any = None, *, tenant: str = DEFAULT_TENANT,
               **options: Any) -> Any:  # fmt: skip
        return self._renewing(
            seq_ids,
            tenant,
            lambda: self._service.attend(layer, seq_ids, q_lens, q, k_new, v_new, tenant=tenant, **options),
        )

    def offload(self, seq_ids: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> None:
        self._renewing(seq_ids, tenant, lambda: self._service.offload(seq_ids, tenant=tenant))

    def prefetch(self, seq_ids: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> None:
        self._renewing(seq_ids, tenant, lambda: self._service.prefetch(seq_ids, tenant=tenant))

    def get_sequence(self, seq_id: int, *, tenant: str = DEFAULT_TENANT) -> SequenceInfo:
        return self._renewing([seq_id], tenant, lambda: self._service.get_sequence(seq_id, tenant=tenant))

    def lookup_prefix(self, tokens: Sequence[int], *, tenant: str = DEFAULT_TENANT) -> dict[int, int]:
        return self._service.lookup_prefix(tokens, tenant=tenant)

    def stats(self) -> dict[str, Any]:
        stats = dict(self._service.stats())
        stats["leases"] = {
            "active": len(self.leases),
            "expired": self._num_expired,
            "default_ttl_s": self.default_ttl_s,
        }
        return stats


def _ids(seq_ids: Iterable[Any]) -> list[int]:
    """The plain int ids among ``seq_ids`` (anything else names no lease)."""
    try:
        return [s for s in seq_ids if isinstance(s, int) and not isinstance(s, bool)]
    except TypeError:
        return []
