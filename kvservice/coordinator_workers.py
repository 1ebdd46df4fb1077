"""Worker handles: one small adapter so the coordinator drives local and Ray workers alike.

``submit(method, *args)`` enqueues a call and returns a ``PendingCall``; ``result()``
waits for it. The one guarantee the coordinator builds on: **calls to one worker run in
the order they were submitted**. The coordinator submits under its table lock, so a
command planned later (a swap-out that frees a block, say) never runs before a call
planned earlier that still reads that block.

- A Ray actor gives that order itself (one caller, a sequential actor): ``submit`` is
  ``.remote`` and ``result`` is ``ray.get``.
- A local ``Worker`` gets it from tickets: ``submit`` takes the next ticket, and
  ``result()`` runs the call in the caller's own thread once every earlier ticket of that
  worker has run (no thread hop, tensors passed as they are). Every submitted call must
  be resolved with ``result()``: ``resolve_all`` does that even when one of them fails.

A worker that is gone raises ``WorkerLost``; errors the worker raises on purpose
(``KVServiceError``) come through unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Protocol

from kvservice.core.errors import KVServiceError


class WorkerLost(Exception):
    """The worker process (actor) died; its blocks and sequences are gone."""

    def __init__(self, worker_id: int, cause: BaseException | None = None) -> None:
        super().__init__(f"worker {worker_id} is lost: {cause}")
        self.worker_id = worker_id


class PendingCall(Protocol):
    def result(self) -> Any: ...


class WorkerHandle(Protocol):
    worker_id: int

    def submit(self, method: str, *args: Any, **kwargs: Any) -> PendingCall: ...

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def resolve_all(pending: Iterable[PendingCall]) -> list[Any]:
    """Every call's result, in order; all are resolved, then the first error is raised.

    A ``WorkerLost`` is raised in preference to other errors: it changes the tables.
    """
    results: list[Any] = []
    first: BaseException | None = None
    for p in pending:
        try:
            results.append(p.result())
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised below
            results.append(None)
            if first is None or (isinstance(exc, WorkerLost) and not isinstance(first, WorkerLost)):
                first = exc
    if first is not None:
        raise first
    return results


class _LocalPending:
    __slots__ = ("_handle", "_ticket", "_method", "_args", "_kwargs", "_done", "_value", "_error")

    def __init__(self, handle: LocalWorkerHandle, ticket: int, method: str, args: Any, kwargs: Any):
        self._handle = handle
        self._ticket = ticket
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def result(self) -> Any:
        if not self._done:
            self._done = True
            try:
                self._value = self._handle._run_in_turn(
                    self._ticket, self._method, self._args, self._kwargs
                )
            except BaseException as exc:
                self._error = exc
            self._args = self._kwargs = None  # drop tensor references
        if self._error is not None:
            raise self._error
        return self._value


class LocalWorkerHandle:
    """A ``Worker`` object in this process, called directly (zero copy), in ticket order."""

    def __init__(self, worker_id: int, worker: Any) -> None:
        self.worker_id = worker_id
        self.worker = worker
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def submit(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
        return _LocalPending(self, ticket, method, args, kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.submit(method, *args, **kwargs).result()

    def execute(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one call on the worker now (its turn has come); tests override it to fail."""
        return getattr(self.worker, method)(*args, **kwargs)

    def _run_in_turn(self, ticket: int, method: str, args: Any, kwargs: Any) -> Any:
        with self._cond:
            while self._serving != ticket:
                self._cond.wait()
        try:
            return self.execute(method, *args, **kwargs)
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class _RayPending:
    __slots__ = ("_handle", "_ref")

    def __init__(self, handle: RayWorkerHandle, ref: Any) -> None:
        self._handle = handle
        self._ref = ref

    def result(self) -> Any:
        return self._handle.get(self._ref)


class RayWorkerHandle:
    """A worker actor; calls go through ``.remote`` and ``ray.get``."""

    def __init__(self, worker_id: int, actor: Any) -> None:
        self.worker_id = worker_id
        self.actor = actor

    def submit(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        return _RayPending(self, getattr(self.actor, method).remote(*args, **kwargs))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.submit(method, *args, **kwargs).result()

    def get(self, ref: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayActorError as exc:
            raise WorkerLost(self.worker_id, exc) from exc
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, KVServiceError | ValueError | TypeError):
                raise cause from None
            raise
