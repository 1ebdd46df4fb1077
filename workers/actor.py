"""The Ray shell around ``Worker``: the actor factory and a worker group's life cycle.

``Worker`` itself never imports Ray; ``make_worker_actor`` wraps it, so the same class
runs embedded and as an actor. A group is one actor per GPU, each in its own bundle of
one placement group ({"GPU": 1}, or {"CPU": 1} on a cluster without GPUs), with named
actors in a namespace (``kvservice-worker-<id>``) so a restarted coordinator finds them.
A stopped worker leaves its bundle vacant; ``start_worker_in_bundle`` puts a new worker
there (scaling back up reuses the GPU). Actors run with ``TRANSFER_ENV`` set (NVLS and
multicast off for NCCL transfers between workers).

Step tickets' attention calls (``ticket_call``) run on threads of their own (Ray's
concurrency group ``TICKET_GROUP``) beside the one thread of every other call: a ticket
call holds the worker's lock only while it checks its arguments and queues its kernels,
and waits for its output outside it, so the next call's kernels are queued while this
call's run and its output goes back. Every other call holds the lock throughout and keeps
Ray's per-caller order; ticket calls in flight together may run in any order (a call that
needs another's writes waits for its result first, as a model's next layer does).

Restarts: Ray re-runs the constructor, so a restarted worker has a new epoch, zeroed
pools and an empty ledger. Calls are never retried on a restarted worker
(``max_task_retries=0``): a call in flight when a worker dies fails, and the caller
learns of the loss instead of reading a fresh, empty pool.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvservice.workers.channel import ChannelServer
from kvservice.workers.host_result import HostResult
from kvservice.workers.transfer import TRANSFER_ENV
from kvservice.workers.transfer_peer import host_identity
from kvservice.workers.wire import PlanDecoder, decode_tensor, encode_result
from kvservice.workers.worker import Worker

from kvservice.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from kvservice.core.layout import Layout

if TYPE_CHECKING:
    from ray.actor import ActorClass, ActorHandle
    from ray.util.placement_group import PlacementGroup

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "kvservice"
ACTOR_NAME_PREFIX = "kvservice-worker-"
PLACEMENT_GROUP_NAME = "kvservice-workers"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TICKET_GROUP = "tickets"
# Two threads: one queues a call's kernels while the other waits for and returns its own.
TICKET_THREADS = 2


def make_worker_actor(**ray_options: Any) -> ActorClass:
    """``Worker`` as a Ray actor class, with ``ray_options`` (num_gpus, max_restarts, ...)
    and the ticket calls' concurrency group."""
    import ray

    options = {"concurrency_groups": {TICKET_GROUP: TICKET_THREADS}, **ray_options}
    return ray.remote(**options)(RayWorker)


class RayWorker(Worker):
    """``Worker`` with one more entry point for callers in other processes: ``wire_call``
    takes plans and tensors in their wire form (``kvservice.workers.wire``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.device.type == "cuda":
            # A GPU actor asks Ray for no CPU, so nothing limits torch's threads: on a
            # many-core host each small CPU op of a plan then costs milliseconds of thread
            # wake-ups, worse with every actor on the host. Its CPU work is small: one.
            import torch

            torch.set_num_threads(1)
        self._wire_plans = PlanDecoder(size=32)
        self._profiler: Any = None
        # Held by every call while it touches the worker (see the module docstring).
        self._lock = threading.RLock()
        self._channel: ChannelServer | None = None  # started by the first channel_address
        # Everything made so far (torch, Ray, the pools' bookkeeping) lives as long as the
        # actor: out of the collector's sight, a full collection, which a call's small
        # allocations trigger now and then, no longer walks it (tens of ms in a mid-call).
        gc.freeze()

    def fenced(self, epoch: int, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return super().fenced(epoch, method, *args, **kwargs)

    def wire_call(self, epoch: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """``fenced(epoch, method, ...)`` with wire plans and tensors decoded; tensors in
        the result come back in wire form."""
        with self._lock, self._profiled():
            decoded, options = self._decoded(args, kwargs)
            return encode_result(self.fenced(epoch, method, *decoded, **options))

    def ticket_call(self, epoch: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """``wire_call`` of an ``attend`` through a step ticket, for the ticket threads:
        the lock is held while the call is checked and queued, not while its output
        comes back. Anything else is refused: only ticket calls may run out of order."""
        return encode_result(self._queue_ticket_call(epoch, method, args, kwargs).wait())

    def _queue_ticket_call(
        self, epoch: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> HostResult:
        """Check a ticket call and queue its kernels under the lock (``ticket_call``'s and
        the local channel's calls alike); its output comes back through the result."""
        if method != "attend" or kwargs.get("ticket") is None:
            raise InvalidArgument(f"only attend through a step ticket runs here, not {method!r}")
        with self._lock, self._profiled():
            decoded, options = self._decoded(args, kwargs)
            return self.fenced(epoch, "attend_to_host", *decoded, **options)

    def channel_address(self) -> tuple[str, str]:
        """(host identity, address) of this worker's local channel
        (``kvservice.workers.channel``), started on the first ask: callers on this host
        may send their ticket calls through it instead of Ray."""
        with self._lock:
            if self._channel is None:
                self._channel = ChannelServer(
                    self._channel_call, pin_memory=self.device.type == "cuda"
                )
            return host_identity(), self._channel.address

    def close_channel(self) -> None:
        """Stop the local channel; its callers see it close (and go through Ray again)."""
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _channel_call(
        self, epoch: int, layer: int, plan: Any, q: Any, k_new: Any, v_new: Any,
        *, ticket: int | None, **options: Any,
    ) -> HostResult:  # fmt: skip
        """A call read from the local channel, queued as ``ticket_call`` queues one."""
        return self._queue_ticket_call(
            epoch, "attend", (layer, plan, q, k_new, v_new), {"ticket": ticket, **options}
        )

    def stats(self) -> dict[str, Any]:
        channel = self._channel
        return super().stats() | {"channel": channel.stats() if channel is not None else None}

    def _decoded(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A wire call's arguments: plans and tensors decoded (under the lock: the plan
        decoder's cache is shared)."""
        decoded = tuple(decode_tensor(self._wire_plans.decode(a)) for a in args)
        return decoded, {k: decode_tensor(v) for k, v in kwargs.items()}

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        """This thread's work under ``profile_calls`` (entered under the lock: one thread
        at a time)."""
        profiler = self._profiler
        if profiler is not None:
            profiler.enable()
        try:
            yield
        finally:
            if profiler is not None:
                profiler.disable()

    def profile_calls(self, start: bool, top: int = 25) -> str | None:
        """Operators' view of where a worker's wire calls spend host time: ``start`` turns
        a cProfile of every call on; stopping returns its table (by own time) and ends it."""
        import cProfile
        import io
        import pstats

        if start:
            self._profiler = cProfile.Profile()
            return None
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return None
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        return text.getvalue()


def actor_name(worker_id: int) -> str:
    return f"{ACTOR_NAME_PREFIX}{worker_id}"


@dataclass
class WorkerGroup:
    """Worker actors started together, by worker id, and the placement group holding them."""

    namespace: str
    placement_group: PlacementGroup
    actors: dict[int, ActorHandle] = field(default_factory=dict)
    # Worker id -> its bundle; a bundle whose worker was stopped can take a new worker.
    bundles: dict[int, int] = field(default_factory=dict)
    use_gpu: bool = False
    detached: bool = True
    max_restarts: int = 3

    def vacant_bundles(self) -> list[int]:
        taken = {self.bundles[w] for w in self.actors}
        return [i for i in range(self.placement_group.bundle_count) if i not in taken]


def start_worker_actors(
    layout: Layout,
    num_workers: int,
    *,
    use_gpu: bool | None = None,
    first_worker_id: int = 0,
    strategy: str = "PACK",
    namespace: str = DEFAULT_NAMESPACE,
    max_restarts: int = 3,
    detached: bool = True,
    ready_timeout_s: float = 120.0,
    **worker_kwargs: Any,
) -> WorkerGroup:
    """Start ``num_workers`` named worker actors, one per placement-group bundle.

    ``use_gpu=None`` uses GPUs when the cluster has any. ``worker_kwargs`` go to
    ``Worker`` (num_gpu_blocks, gpu_mem_fraction, num_cpu_blocks, cpu_pool_gib).
    ``detached`` actors outlive the process that started them, which is what lets a
    restarted coordinator find them with ``find_worker_actors``.
    Returns once every worker has constructed its pools (raises Unavailable otherwise).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise InvalidArgument(f"num_workers must be an int >= 1, got {num_workers!r}")
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    worker_ids = range(first_worker_id, first_worker_id + num_workers)
    running = set(find_worker_actors(namespace)).intersection(worker_ids)
    if running:
        raise FailedPrecondition(
            f"worker actors {sorted(running)} already run in namespace {namespace!r}; "
            "reach them with find_worker_actors"
        )
    lifetime = "detached" if detached else None
    resource = {"GPU": 1} if use_gpu else {"CPU": 1}
    pg = placement_group(
        [dict(resource) for _ in range(num_workers)],
        strategy=strategy,
        name=f"{PLACEMENT_GROUP_NAME}-{namespace}-{first_worker_id}",
        lifetime=lifetime,
    )
    try:
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        remove_placement_group(pg)
        raise Unavailable(
            f"the cluster could not place {num_workers} bundles of {resource} "
            f"within {ready_timeout_s}s (strategy {strategy})"
        ) from exc

    group = WorkerGroup(
        namespace, pg, use_gpu=use_gpu, detached=detached, max_restarts=max_restarts
    )
    for index, worker_id in enumerate(worker_ids):
        _launch(group, layout, worker_id, index, worker_kwargs)
    try:
        infos: list[Any] = ray.get(
            [a.info.remote() for a in group.actors.values()], timeout=ready_timeout_s
        )
    except Exception as exc:
        stop_worker_actors(group)
        raise Unavailable(f"worker actors failed to start: {exc}") from exc
    for info in infos:
        logger.info(
            "worker actor %d up on %s, epoch %d, %d + %d blocks",
            info.worker_id, info.device, info.epoch, info.num_gpu_blocks, info.num_cpu_blocks,
        )  # fmt: skip
    return group


def _launch(
    group: WorkerGroup, layout: Layout, worker_id: int, bundle: int, worker_kwargs: dict[str, Any]
) -> ActorHandle:
    """One worker actor in one bundle of the group's placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_cls = make_worker_actor(
        num_gpus=1 if group.use_gpu else 0,
        num_cpus=0 if group.use_gpu else 1,
        max_restarts=group.max_restarts,
        max_task_retries=0,
        # Transfers between workers may use NCCL: NVLS and multicast stay off.
        runtime_env={"env_vars": dict(TRANSFER_ENV)},
    )
    actor = actor_cls.options(  # type: ignore[attr-defined]
        name=actor_name(worker_id),
        namespace=group.namespace,
        lifetime="detached" if group.detached else None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group.placement_group, placement_group_bundle_index=bundle
        ),
    ).remote(worker_id, layout, device="cuda" if group.use_gpu else "cpu", **worker_kwargs)
    group.actors[worker_id] = actor
    group.bundles[worker_id] = bundle
    return actor


def start_worker_in_bundle(
    group: WorkerGroup,
    layout: Layout,
    worker_id: int,
    bundle: int,
    *,
    ready_timeout_s: float = 120.0,
    **worker_kwargs: Any,
) -> ActorHandle:
    """Start worker ``worker_id`` in a vacant bundle of ``group`` (one whose worker was
    stopped); returns once its pools are up (raises Unavailable otherwise)."""
    import ray

    if bundle not in group.vacant_bundles():
        raise FailedPrecondition(f"bundle {bundle} of the worker group is not vacant")
    if worker_id in find_worker_actors(group.namespace):
        raise FailedPrecondition(f"worker actor {worker_id} already runs in {group.namespace!r}")
    actor = _launch(group, layout, worker_id, bundle, worker_kwargs)
    try:
        ray.get(actor.info.remote(), timeout=ready_timeout_s)
    except Exception as exc:
        stop_worker_actors(group, [worker_id])
        raise Unavailable(f"worker actor {worker_id} failed to start: {exc}") from exc
    return actor


def find_worker_actors(namespace: str = DEFAULT_NAMESPACE) -> dict[int, ActorHandle]:
    """The live named worker actors of ``namespace``, by worker id."""
    import ray

    found: dict[int, ActorHandle] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != namespace or not name.startswith(ACTOR_NAME_PREFIX):
            continue
        suffix = name[len(ACTOR_NAME_PREFIX) :]
        if suffix.isdigit():
            found[int(suffix)] = ray.get_actor(name, namespace=namespace)
    return dict(sorted(found.items()))


def stop_worker_actors(group: WorkerGroup, worker_ids: Iterable[int] | None = None) -> None:
    """Kill the group's actors (all, or ``worker_ids``); the placement group goes with the last."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for worker_id in list(group.actors if worker_ids is None else worker_ids):
        handle = group.actors.pop(worker_id, None)
        group.bundles.pop(worker_id, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)
    if not group.actors:
        remove_placement_group(group.placement_group)
