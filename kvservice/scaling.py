"""Scaling a running server: workers join and leave while it serves.

Design: desired state, reconciled. The server (``start_ray_service(..., scaling=True)``,
which ``kvservice serve`` uses) starts a ``ScaleController`` next to its coordinator and
a small named Ray actor, the *scale control* (``kvservice-scale`` in the workers'
namespace), that holds what operators asked for and what the controller last did.
``kvservice scale`` joins the Ray cluster, writes its request into the control actor and
waits until the controller reports it handled; nothing else needs to reach the server,
and anyone who can reach the Ray cluster may scale it (as anyone who can may start or
kill actors there). Every ``interval_s`` the controller:

1. drains the workers named by ``kvservice scale --drain ID`` (and from then on keeps
   the count that leaves: a drained worker is not replaced);
2. moves to the desired worker count: the one set by ``kvservice scale --workers N``,
   or, when following GPUs (``kvservice serve`` without ``--num-workers`` on a GPU
   cluster, or ``kvservice scale --auto``), one worker per GPU in the cluster, so GPUs
   that join are put to work. New workers take vacant bundles of the placement groups
   first (a drained worker's GPU), else a new placement group; leaving workers are
   the least loaded ones;
3. re-forms the transfer group after any change, and rebalances when the GPU-tier loads
   of the busiest and least busy worker differ by more than the coordinator's threshold.

Draining moves a worker's sequences (and pins) to the others before its actor stops
(``Coordinator.drain_worker``); a worker whose sequences do not fit elsewhere stays, and
the error is reported. GPUs that leave the cluster take their workers with them (their
sequences answer DATA_LOSS); the controller never drains on their account.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvservice.coordinator import Coordinator
    from kvservice.core.layout import Layout
    from kvservice.workers import WorkerGroup

log = logging.getLogger(__name__)

CONTROL_NAME = "kvservice-scale"
DEFAULT_INTERVAL_S = 2.0


class ScaleControl:
    """The requests and the controller's last report (a Ray actor; no logic of its own)."""

    def __init__(self) -> None:
        self._target: int | None = None
        self._follow_gpus: bool | None = None
        self._drains: list[int] = []
        self._last_request = 0
        self._status: dict[str, Any] = {"done_request": 0}

    def request(
        self, workers: int | None = None, drain: list[int] | None = None, follow_gpus: bool | None = None
    ) -> int:
        """Record a request; returns its number (the controller reports when it is done)."""
        if workers is not None:
            self._target, self._follow_gpus = workers, False
        if follow_gpus:
            self._target, self._follow_gpus = None, True
        self._drains += [int(w) for w in drain or () if int(w) not in self._drains]
        self._last_request += 1
        return self._last_request

    def take(self) -> dict[str, Any]:
        """The requests since the last take (each is handed out once)."""
        taken = {
            "request": self._last_request,
            "target": self._target,
            "follow_gpus": self._follow_gpus,
            "drain": self._drains,
        }
        self._target, self._follow_gpus, self._drains = None, None, []
        return taken

    def report(self, status: dict[str, Any]) -> None:
        self._status = status

    def status(self) -> dict[str, Any]:
        return {**self._status, "last_request": self._last_request}


def control_actor(namespace: str, *, create: bool) -> Any:
    """The scale control of the server whose workers live in ``namespace``."""
    import ray

    if not create:
        return ray.get_actor(CONTROL_NAME, namespace=namespace)
    actor_cls: Any = ray.remote(ScaleControl)
    return actor_cls.options(
        name=CONTROL_NAME, namespace=namespace, num_cpus=0, max_concurrency=4
    ).remote()


class ScaleController:
    """Keeps a coordinator's workers at the requested count (see the module docstring).

    ``groups``: the worker groups the service started (their vacant bundles are reused);
    ``actors``: every worker actor by id (those of ``groups`` and adopted ones);
    ``cluster_gpus``: how many GPUs the cluster has now (default: Ray's resources).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        layout: Layout,
        *,
        namespace: str,
        actors: dict[int, Any],
        groups: list[WorkerGroup] = (),  # type: ignore[assignment]
        use_gpu: bool = False,
        follow_gpus: bool = False,
        detached: bool = True,
        interval_s: float = DEFAULT_INTERVAL_S,
        ready_timeout_s: float = 120.0,
        worker_kwargs: dict[str, Any] | None = None,
        cluster_gpus: Callable[[], int] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.layout = layout
        self.namespace = namespace
        self.actors = dict(actors)
        self.groups = list(groups)
        self.use_gpu = use_gpu
        self.follow_gpus = follow_gpus
        self.detached = detached
        self.interval_s = interval_s
        self.ready_timeout_s = ready_timeout_s
        self.worker_kwargs = dict(worker_kwargs or {})
        self.cluster_gpus = cluster_gpus or _cluster_gpus
        self.target: int | None = None
        self.last_error: str | None = None
        self.last_changes: list[str] = []
        self._next_id = max(self.actors, default=-1) + 1
        self._control: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        from kvservice.coordinator_workers import RayWorkerHandle
        from kvservice.rejoin import WorkerRejoiner

        # Lost workers that Ray restarts come back on the next pass (kvservice.rejoin).
        self.rejoiner = WorkerRejoiner(
            coordinator, [RayWorkerHandle(w, a) for w, a in self.actors.items()]
        )

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ScaleController:
        """Create the scale control actor and reconcile every ``interval_s`` in a thread."""
        if self._previous_control_is_gone():
            self._control = control_actor(self.namespace, create=True)
            self._report(0)
        else:
            log.error(
                "another server's scale control answers in namespace %r: this server "
                "scales only by following GPUs", self.namespace,
            )  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="kvservice-scale", daemon=True)
        self._thread.start()
        return self

    def _previous_control_is_gone(self, wait_s: float = 15.0) -> bool:
        """No control actor in the namespace, or only that of a server that died (its
        owner's death takes it down, which may take Ray a moment)."""
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            try:
                old = control_actor(self.namespace, create=False)
            except ValueError:
                return True
            try:
                ray.get(old.status.remote(), timeout=2.0)
            except Exception:  # noqa: BLE001 - dead or dying: wait for its name to go
                pass
            else:
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, 2 * self.interval_s))
        if self._control is not None:
            import ray

            ray.kill(self._control, no_restart=True)
            self._control = None

    def stop_workers(self) -> None:
        """Stop every worker actor of the service (started, added or adopted)."""
        import ray

        from kvservice.workers import stop_worker_actors

        grouped = {w for g in self.groups for w in g.actors}
        for group in self.groups:
            stop_worker_actors(group)
        for worker_id, actor in self.actors.items():
            if worker_id not in grouped:
                ray.kill(actor, no_restart=True)
        self.groups, self.actors = [], {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("scaling pass failed")

    # ------------------------------------------------------------------ one pass
    def reconcile(self) -> dict[str, Any]:
        """Take the control's requests and act on them; returns the status reported."""
        import ray

        with self._lock:
            request: dict[str, Any] = {"request": 0, "target": None, "follow_gpus": None, "drain": []}
            if self._control is not None:
                request = ray.get(self._control.take.remote())
            if request["follow_gpus"] is not None:
                self.follow_gpus = bool(request["follow_gpus"])
            if request["target"] is not None:
                self.target = int(request["target"])
            elif request["follow_gpus"]:
                self.target = None
            self.last_changes = []
            self.last_error = None
            try:
                if request["drain"]:
                    # The operator sizes the server now: the drained workers are not
                    # replaced (until ``--workers`` or ``--auto`` says otherwise).
                    self.follow_gpus = False
                    self.target = len(self.coordinator.worker_ids)
                    for worker_id in request["drain"]:
                        self._drain(int(worker_id))
                        self.target = len(self.coordinator.worker_ids)
                back = self.rejoiner.rejoin()  # restarted workers first: no replacements
                if back:
                    self.last_changes.append(f"workers {back} restarted and rejoined, empty")
                    self._regroup()
                desired = self.desired()
                if desired is not None:
                    self._scale_to(desired)
                if len(self.coordinator.worker_ids) > 1:
                    moved = self.coordinator.rebalance()
                    if moved["sequences"]:
                        self.last_changes.append(f"rebalanced {moved['sequences']} sequences")
            except Exception as exc:  # noqa: BLE001 - reported to whoever asked
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("scaling: %s", self.last_error)
            return self._report(int(request["request"]))

    def desired(self) -> int | None:
        """The worker count to reach now (None: leave it as it is)."""
        if self.target is not None:
            return self.target
        if self.follow_gpus:
            # Only up: GPUs that leave take their workers with them, never a drain.
            gpus = self.cluster_gpus()
            return gpus if gpus > len(self.coordinator.worker_ids) else None
        return None

    def scale_to(self, num_workers: int) -> dict[str, Any]:
        """Add or drain workers until there are ``num_workers`` (at least one)."""
        with self._lock:
            self.target = num_workers
            self.last_changes = []
            self._scale_to(num_workers)
            return self._status()

    def drain(self, worker_id: int) -> dict[str, Any]:
        """Move the worker's sequences to the others, then stop it."""
        with self._lock:
            return self._drain(worker_id)

    # ------------------------------------------------------------------ internals
    def _scale_to(self, num_workers: int) -> None:
        from kvservice.core.errors import InvalidArgument

        if num_workers < 1:
            raise InvalidArgument(f"a server needs at least one worker, not {num_workers}")
        current = self.coordinator.worker_ids
        if num_workers > len(current):
            self._add(num_workers - len(current))
        elif num_workers < len(current):
            usage = self.coordinator.manager.usage()
            # The least used leave first (the fewest blocks to move); newest on ties.
            leaving = sorted(current, key=lambda w: (sum(u.used for u in usage[w].values()), -w))
            for worker_id in leaving[: len(current) - num_workers]:
                self._drain(worker_id)

    def _add(self, count: int) -> None:
        from kvservice.coordinator_workers import RayWorkerHandle
        from kvservice.workers import start_worker_actors
        from kvservice.workers.actor import start_worker_in_bundle

        started: list[int] = []
        try:
            for group in list(self.groups):
                for bundle in group.vacant_bundles():
                    if len(started) == count:
                        break
                    worker_id = self._new_id()
                    self.actors[worker_id] = start_worker_in_bundle(
                        group, self.layout, worker_id, bundle,
                        ready_timeout_s=self.ready_timeout_s, **self.worker_kwargs,
                    )  # fmt: skip
                    started.append(worker_id)
                    self._join(RayWorkerHandle(worker_id, self.actors[worker_id]))
            if len(started) < count:
                group = start_worker_actors(
                    self.layout, count - len(started), use_gpu=self.use_gpu,
                    first_worker_id=self._next_id, namespace=self.namespace,
                    detached=self.detached, ready_timeout_s=self.ready_timeout_s,
                    **self.worker_kwargs,
                )  # fmt: skip
                self.groups.append(group)
                for worker_id, actor in group.actors.items():
                    self._next_id = max(self._next_id, worker_id + 1)
                    self.actors[worker_id] = actor
                    started.append(worker_id)
                    self._join(RayWorkerHandle(worker_id, actor))
        finally:
            if started:
                self.last_changes.append(f"added workers {started}")
                log.info("scaling: added workers %s", started)
                self._regroup()

    def _drain(self, worker_id: int) -> dict[str, Any]:
        from kvservice.workers import stop_worker_actors

        report = self.coordinator.drain_worker(worker_id)
        for group in self.groups:
            if worker_id in group.actors:
                stop_worker_actors(group, [worker_id])
                if not group.actors:  # its placement group went with its last worker
                    self.groups.remove(group)
                break
        else:
            actor = self.actors.get(worker_id)
            if actor is not None:
                import ray

                ray.kill(actor, no_restart=True)
        self.actors.pop(worker_id, None)
        self.rejoiner.forget(worker_id)
        self.last_changes.append(
            f"drained worker {worker_id} ({report['sequences']} sequences, {report['blocks']} blocks)"
        )
        self._regroup()
        return report

    def _join(self, handle: Any) -> None:
        self.coordinator.add_worker(handle)
        self.rejoiner.watch(handle)

    def _regroup(self) -> None:
        try:
            self.coordinator.form_transfer_group()
        except Exception:  # noqa: BLE001 - transfers fall back to host memory
            log.warning("the transfer group could not be formed", exc_info=True)

    def _new_id(self) -> int:
        worker_id = self._next_id
        self._next_id += 1
        return worker_id

    def _status(self) -> dict[str, Any]:
        from kvservice.core.ids import Tier

        manager = self.coordinator.manager
        usage = manager.usage()
        return {
            "workers": {
                str(w): {"gpu_used": int(u[Tier.GPU].used), "gpu_total": int(u[Tier.GPU].total)}
                for w, u in usage.items()
            },
            "num_workers": len(usage),
            "target": self.target,
            "follow_gpus": self.follow_gpus,
            "changes": list(self.last_changes),
            "error": self.last_error,
            "updated_at": time.time(),
        }

    def _report(self, request: int) -> dict[str, Any]:
        status = {**self._status(), "done_request": request}
        if self._control is not None:
            import ray

            ray.get(self._control.report.remote(status))
        return status


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


# -------------------------------------------------------------------- the command


def request_scale(
    namespace: str,
    *,
    workers: int | None = None,
    drain: list[int] | None = None,
    follow_gpus: bool = False,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Ask the server serving ``namespace`` to scale; returns its report once handled
    (the current status when nothing is asked). Ray must be initialized."""
    import ray

    from kvservice.core.errors import Unavailable

    try:
        control = control_actor(namespace, create=False)
    except ValueError:
        raise Unavailable(
            f"no kvservice server with scaling in Ray namespace {namespace!r}"
        ) from None
    if workers is None and not drain and not follow_gpus:
        return dict(ray.get(control.status.remote()))
    request = ray.get(control.request.remote(workers, list(drain or []), follow_gpus or None))
    deadline = time.monotonic() + timeout_s
    while True:
        status = dict(ray.get(control.status.remote()))
        if status.get("done_request", 0) >= request:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not handle the request within {timeout_s}s")
        time.sleep(0.2)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``scale`` to the CLI's subparsers."""
    scale = commands.add_parser(
        "scale", help="add or drain workers of a running server (through its Ray cluster)"
    )
    what = scale.add_mutually_exclusive_group()
    what.add_argument("--workers", type=int, default=None, help="worker count to reach")
    what.add_argument(
        "--drain", type=int, nargs="+", default=None, metavar="WORKER_ID",
        help="move these workers' sequences to the others, then stop them",
    )  # fmt: skip
    what.add_argument(
        "--auto", action="store_true", help="one worker per GPU in the cluster, following it"
    )
    scale.add_argument("--ray-address", default="auto", help="the server's Ray cluster")
    scale.add_argument(
        "--namespace", default=None, help="Ray namespace of the server's workers (default kvservice)"
    )
    scale.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    scale.add_argument("--json", action="store_true", help="print the report as JSON")
    scale.set_defaults(run=run_scale)
    return scale


def run_scale(args: argparse.Namespace) -> int:
    import ray

    from kvservice.workers import DEFAULT_NAMESPACE

    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=False, configure_logging=False)
    status = request_scale(
        args.namespace or DEFAULT_NAMESPACE,
        workers=args.workers,
        drain=args.drain,
        follow_gpus=args.auto,
        timeout_s=args.timeout,
    )
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return 1 if status.get("error") else 0


def format_status(status: dict[str, Any]) -> str:
    lines = [f"{'worker':>8}{'gpu blocks used':>18}{'of':>10}"]
    for worker_id, worker in sorted(status.get("workers", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"{worker_id:>8}{worker['gpu_used']:>18}{worker['gpu_total']:>10}")
    target = "one per GPU" if status.get("follow_gpus") and status.get("target") is None else status.get("target")
    lines.append(f"workers: {status.get('num_workers', 0)}, target: {target}")
    lines += [f"  {change}" for change in status.get("changes", [])]
    if status.get("error"):
        lines.append(f"error: {status['error']}")
    return "\n".join(lines)
