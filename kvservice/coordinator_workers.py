"""Worker handles: one small adapter so the coordinator drives local and Ray workers alike.

``submit(method, *args)`` enqueues a call and returns a ``PendingCall``; ``result()``
waits for it. The one guarantee the coordinator builds on: **calls to one worker run in
the order they were submitted**. The coordinator submits under its table lock, so a
command planned later (a swap-out that frees a block, say) never runs before a call
planned earlier that still reads that block.

- A Ray actor gives that order itself (one caller, a sequential actor): ``submit`` is
  ``.remote`` and ``result`` is ``ray.get``.
- A local ``Worker`` gets it from a queue: ``submit`` appends the call, and ``result()``
  runs queued calls oldest first, one at a time, in the waiting caller's own thread (no
  thread hop, tensors passed as they are) until its own has run.

A worker that is gone raises ``WorkerLost``; errors the worker raises on purpose
(``KVServiceError``) come through unchanged.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from kvservice.core.errors import KVServiceError
from kvservice.workers.actor import TICKET_GROUP
from kvservice.workers.wire import PlanEncoder, decode_result, encode_tensor
from kvservice.workers.worker import StaleEpoch

if TYPE_CHECKING:
    from kvservice.ticket_channel import ChannelConnection

# Calls whose plan and tensors go to a Ray worker in wire form (kvservice.workers.wire):
# block tables as numpy arrays under a per-plan key, tensors as numpy arrays, both ways.
# Blocks moved through host memory too: Ray pickles a torch tensor at ~0.15 GB/s, and
# passes a numpy array's buffer as it is.
WIRE_METHODS = frozenset({"attend", "export_blocks", "import_blocks"})


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

    def submit_ticket_call(self, method: str, *args: Any, **kwargs: Any) -> PendingCall: ...

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
    __slots__ = ("_handle", "_method", "_args", "_kwargs", "done", "_value", "_error")

    def __init__(self, handle: LocalWorkerHandle, method: str, args: Any, kwargs: Any) -> None:
        self._handle = handle
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self.done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        """Execute the call (the handle calls this in turn); never raises."""
        try:
            self._value = self._handle.execute(self._method, *self._args, **self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - delivered by result()
            self._error = exc
        self._args = self._kwargs = None  # drop tensor references
        self.done = True

    def result(self) -> Any:
        if not self.done:
            self._handle._run_until(self)
        if self._error is not None:
            raise self._error
        return self._value


class LocalWorkerHandle:
    """A ``Worker`` object in this process, called directly (zero copy), in submission order.

    ``result()`` runs queued calls one at a time, oldest first, in the waiting thread,
    until its own is done; another thread's earlier call is run by whoever waits first.
    So waiting in any order, or never waiting for some call, cannot stall the worker.
    """

    def __init__(self, worker_id: int, worker: Any) -> None:
        self.worker_id = worker_id
        self.worker = worker
        self._cond = threading.Condition()
        self._queue: deque[_LocalPending] = deque()
        self._busy = False

    def submit(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        pending = _LocalPending(self, method, args, kwargs)
        with self._cond:
            self._queue.append(pending)
        return pending

    def submit_ticket_call(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        """A step ticket's call: here, in order with the others."""
        return self.submit(method, *args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.submit(method, *args, **kwargs).result()

    def execute(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one call on the worker now (its turn has come); tests override it to fail."""
        return getattr(self.worker, method)(*args, **kwargs)

    def _run_until(self, target: _LocalPending) -> None:
        while True:
            with self._cond:
                while not target.done and (self._busy or not self._queue):
                    self._cond.wait()
                if target.done:
                    return
                pending = self._queue.popleft()
                self._busy = True
            try:
                pending.run()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class _RayPending:
    __slots__ = ("_handle", "_ref", "_learns_epoch", "_wire")

    def __init__(
        self, handle: RayWorkerHandle, ref: Any, learns_epoch: bool = False, wire: bool = False
    ) -> None:
        self._handle = handle
        self._ref = ref
        self._learns_epoch = learns_epoch
        self._wire = wire

    def result(self) -> Any:
        value = self._handle.get(self._ref)
        if self._wire:
            return decode_result(value)
        if self._learns_epoch and self._handle.epoch is None:
            self._handle.epoch = value.epoch
        return value


class RayWorkerHandle:
    """A worker actor; calls go through ``.remote`` and ``ray.get``.

    Ray restarts a dead actor behind the same handle, with empty pools. So once the
    worker's epoch is known (from its first ``info``), every other call is fenced by it
    (``Worker.fenced``): the restarted actor refuses calls meant for the dead one, and
    that is WorkerLost, never a read of blocks that hold nothing. ``forget_epoch`` lets
    the next ``info`` learn a new epoch (a restarted worker taken back, empty).
    """

    def __init__(self, worker_id: int, actor: Any, epoch: int | None = None) -> None:
        self.worker_id = worker_id
        self.actor = actor
        self.epoch = epoch
        self._plans = PlanEncoder()
        # Ticket calls go through the worker's local channel when this process is on the
        # worker's host (``kvservice.ticket_channel``); False keeps them on Ray.
        self.use_channel = True

    def __reduce__(self) -> tuple[Any, ...]:
        # Another process gets its own plan encoder: plan keys name one sender's plans.
        return (RayWorkerHandle, (self.worker_id, self.actor, self.epoch))

    def forget_epoch(self) -> None:
        self.epoch = None

    def submit(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        if self.epoch is None or method == "info":
            ref = getattr(self.actor, method).remote(*args, **kwargs)
            return _RayPending(self, ref, learns_epoch=method == "info")
        if method in WIRE_METHODS:
            wire_args, options = self._wire_form(args, kwargs)
            ref = self.actor.wire_call.remote(self.epoch, method, *wire_args, **options)
            return _RayPending(self, ref, wire=True)
        return _RayPending(self, self.actor.fenced.remote(self.epoch, method, *args, **kwargs))

    def submit_ticket_call(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        """A step ticket's ``attend``, on the worker's ticket threads: it may run beside
        and in any order with this handle's other ticket calls (``RayWorker.ticket_call``)."""
        if self.epoch is None or method not in WIRE_METHODS:
            return self.submit(method, *args, **kwargs)
        channel = self._local_channel() if self.use_channel else None
        if channel is not None and len(args) == 5 and kwargs.get("ticket") is not None:
            layer, plan, q, k_new, v_new = args
            options = dict(kwargs)
            ticket = options.pop("ticket")
            return channel.submit(
                self.epoch, layer, self._plans.encode(plan), (q, k_new, v_new), ticket, options
            )
        wire_args, options = self._wire_form(args, kwargs)
        ticket_call = self.actor.ticket_call.options(concurrency_group=TICKET_GROUP)
        return _RayPending(
            self, ticket_call.remote(self.epoch, method, *wire_args, **options), wire=True
        )

    def _local_channel(self) -> ChannelConnection | None:
        """This process's connection to the worker's local channel (shared by every copy
        of this handle here); None when the worker is on another host or the channel
        cannot be reached."""
        from kvservice.ticket_channel import shared_connection

        key = getattr(self.actor, "_actor_id", None) or id(self)
        return shared_connection(key, self.worker_id, self._channel_address)

    def _channel_address(self) -> str:
        from kvservice.workers.transfer_peer import host_identity

        host, address = self.get(self.actor.channel_address.remote())
        if host != host_identity():
            raise OSError("the worker is on another host")
        return str(address)

    def _wire_form(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        wire_args = [encode_tensor(a) for a in args]
        if len(wire_args) > 1:
            wire_args[1] = self._plans.encode(wire_args[1])  # (layer, plan, ...)
        return wire_args, {k: encode_tensor(v) for k, v in kwargs.items()}

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
            if isinstance(cause, StaleEpoch):
                raise WorkerLost(self.worker_id, cause) from None
            if isinstance(cause, KVServiceError | ValueError | TypeError):
                raise cause from None
            raise
