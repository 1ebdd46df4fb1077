"""Workers that come back: a worker actor that Ray restarted rejoins, empty.

When a worker actor dies, the coordinator drops it (its sequences answer DATA_LOSS,
naming them, until freed) and Ray restarts the actor behind the same handle: a new
epoch, empty pools, an empty ledger. Calls meant for the dead one are refused by the
new one (the epoch fence of ``RayWorkerHandle``), so nothing reads its empty pools by
mistake. ``WorkerRejoiner.rejoin`` finds such workers (not serving, answering again with
an epoch other than the last one known), clears whatever reached their ledger after the
loss, and hands them back to the coordinator (``Coordinator.add_worker``): their whole
capacity serves new sequences again. A worker that left on purpose (drained) answers
with its old epoch, or not at all, and is left alone (``forget`` it). The scale
controller of ``kvservice serve`` (``kvservice.scaling``) runs ``rejoin`` on every pass,
before it would start workers to replace lost ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kvservice.coordinator_workers import WorkerHandle

log = logging.getLogger(__name__)


class WorkerRejoiner:
    """Watches ``handles`` (the coordinator's workers) and takes restarted ones back."""

    def __init__(self, coordinator: Any, handles: Iterable[WorkerHandle]) -> None:
        self._coordinator = coordinator
        self._handles: dict[int, WorkerHandle] = {}
        self._epochs: dict[int, int] = {}
        for handle in handles:
            self.watch(handle)

    def watch(self, handle: WorkerHandle) -> None:
        """Watch one more worker (one that joined later); learns its epoch now."""
        epoch = getattr(handle, "epoch", None)
        self._epochs[handle.worker_id] = epoch if epoch is not None else handle.call("info").epoch
        self._handles[handle.worker_id] = handle

    def forget(self, worker_id: int) -> None:
        """Stop watching a worker (it left on purpose)."""
        self._handles.pop(worker_id, None)
        self._epochs.pop(worker_id, None)

    def rejoin(self) -> list[int]:
        """Take back every watched worker that restarted since it was lost; their ids."""
        serving = set(self._coordinator.worker_ids)
        back: list[int] = []
        for worker_id, handle in self._handles.items():
            if worker_id in serving:
                continue
            try:
                epoch = self._take_back(handle)
            except Exception as exc:  # still restarting, or gone for good: next round
                log.debug("worker %d is not back: %s", worker_id, exc)
                continue
            if epoch is not None:
                self._epochs[worker_id] = epoch
                back.append(worker_id)
                log.info("worker %d restarted (epoch %d) and rejoined, empty", worker_id, epoch)
        return back

    def _take_back(self, handle: WorkerHandle) -> int | None:
        forget = getattr(handle, "forget_epoch", None)
        if forget is not None:
            forget()  # its next info teaches the handle the new epoch, which fences what follows
        info = handle.call("info")
        if info.epoch == self._epochs.get(handle.worker_id):
            return None  # the same incarnation: it left on purpose, or was never restarted
        stale = list(handle.call("ledger").records)
        if stale:  # records that reached the new incarnation before the fence knew it
            handle.call("update_ledger", {}, stale)
        self._coordinator.add_worker(handle)
        return int(info.epoch)
