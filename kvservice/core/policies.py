"""Pluggable policies: where a new sequence goes, and which sequences swap out first.

Each kind is a small ABC plus a registry dict; the manager takes a registry key, so a
new policy is one class and one dict entry. Which *cached block* goes first is not a
policy: the free queue already orders them least recently released first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvservice.core.ids import WorkerId


@dataclass(frozen=True, slots=True)
class WorkerCandidate:
    worker_id: WorkerId
    num_cached_tokens: int  # of the new prompt, on this worker
    num_available_blocks: int  # GPU blocks free or cached
    num_blocks: int = 0  # GPU blocks in all (0: unknown, load is not compared)


class PlacementPolicy(ABC):
    @abstractmethod
    def choose(self, candidates: Sequence[WorkerCandidate]) -> WorkerId:
        """Pick one of the (non-empty) candidates."""


class PrefixAffinity(PlacementPolicy):
    """The worker holding the longest cached prefix; otherwise the one with most room."""

    def choose(self, candidates: Sequence[WorkerCandidate]) -> WorkerId:
        best = max(
            candidates,
            key=lambda c: (c.num_cached_tokens, c.num_available_blocks, -c.worker_id),
        )
        return best.worker_id


class MostFree(PlacementPolicy):
    """Spread load: the most available GPU blocks, ignoring cached prefixes."""

    def choose(self, candidates: Sequence[WorkerCandidate]) -> WorkerId:
        return max(candidates, key=lambda c: (c.num_available_blocks, -c.worker_id)).worker_id


class PrefixAffinityLoad(PlacementPolicy):
    """Prefix affinity among the workers not much busier than the least busy one.

    Load is the share of a worker's GPU tier in use. A worker busier than the least busy
    by more than ``slack`` of its pool (and by more than ``min_slack_blocks``: a few
    blocks of difference are noise) never wins on its cached prefix, so a popular prefix
    cannot pile every sequence onto one worker; the coordinator may copy that prefix to
    the chosen worker instead (``kvservice.core.migration.place``). Without pool sizes
    it is ``PrefixAffinity``.
    """

    def __init__(self, slack: float = 0.1, min_slack_blocks: int = 64) -> None:
        self.slack = slack
        self.min_slack_blocks = min_slack_blocks

    def choose(self, candidates: Sequence[WorkerCandidate]) -> WorkerId:
        if all(c.num_blocks > 0 for c in candidates):
            loads = {c.worker_id: 1 - c.num_available_blocks / c.num_blocks for c in candidates}
            least = min(loads.values())
            candidates = [
                c
                for c in candidates
                if loads[c.worker_id] - least <= max(self.slack, self.min_slack_blocks / c.num_blocks)
            ]
        return PrefixAffinity().choose(candidates)


PLACEMENT_POLICIES: dict[str, type[PlacementPolicy]] = {
    "prefix_affinity": PrefixAffinity,
    "affinity_load": PrefixAffinityLoad,
    "most_free": MostFree,
}


class EvictionPolicy(ABC):
    """Orders one worker's sequences for swapping out, coldest first."""

    @abstractmethod
    def touch(self, seq_id: int) -> None:
        """The sequence was used (created, appended, written or attended)."""

    @abstractmethod
    def remove(self, seq_id: int) -> None:
        """The sequence left this worker."""

    @abstractmethod
    def coldest(self) -> Iterator[int]:
        """Sequences, the first to swap out first."""


class LRUEviction(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, seq_id: int) -> None:
        try:
            self._order.move_to_end(seq_id)
        except KeyError:
            self._order[seq_id] = None

    def remove(self, seq_id: int) -> None:
        self._order.pop(seq_id, None)

    def coldest(self) -> Iterator[int]:
        return iter(list(self._order))


class FIFOEviction(LRUEviction):
    """Oldest sequence first, however recently it was used."""

    def touch(self, seq_id: int) -> None:
        self._order.setdefault(seq_id, None)


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUEviction,
    "fifo": FIFOEviction,
}
