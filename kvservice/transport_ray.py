"""The Ray transport: the coordinator as a named Ray actor, clients anywhere in the cluster.

- ``start_ray_service`` builds a ``Coordinator`` in this process over worker actors
  (``kvservice.workers.start_worker_actors``); ``kvservice serve`` uses it. When live
  worker actors are already registered in the namespace (a coordinator restarted), it
  rebuilds the tables from their ledgers instead of starting new ones.
- ``CoordinatorActor`` is a plain class that does the same inside an actor; Ray makes it
  an actor in ``make_coordinator_actor`` (threaded, so many clients are served at once;
  the coordinator serializes its own table updates).
- ``RayTransport`` is the client side: every ``Service`` method is one actor call.
  Errors raised on purpose come back as values and are re-raised as themselves (not
  wrapped in RayTaskError); a dead coordinator actor is UNAVAILABLE.

Tensors travel through Ray's object store (pickled by Ray inside the cluster; the
"never pickle" rule is the gRPC wire's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvservice.coordinator import Coordinator
from kvservice.coordinator_workers import RayWorkerHandle
from kvservice.core.errors import KVServiceError, Unavailable
from kvservice.core.layout import Layout
from kvservice.layouts import DEFAULT_BLOCK_SIZE, parse_layout

log = logging.getLogger(__name__)

DEFAULT_ACTOR_NAME = "kvservice"
# Client calls the coordinator actor serves at once.
ACTOR_MAX_CONCURRENCY = 64

_COORDINATOR_OPTIONS = (
    "high_watermark", "low_watermark", "vocab_size", "metrics", "segment_tokens", "quotas",
    "default_quota",
)  # fmt: skip
_WORKER_OPTIONS = (
    "num_gpu_blocks", "gpu_mem_fraction", "num_cpu_blocks", "cpu_pool_gib", "decode_graphs",
)  # fmt: skip


def worker_namespace(name: str) -> str:
    """The Ray namespace of the worker actors that serve coordinator ``name``."""
    from kvservice.workers import DEFAULT_NAMESPACE

    return DEFAULT_NAMESPACE if name == DEFAULT_ACTOR_NAME else f"{DEFAULT_NAMESPACE}-{name}"


def start_ray_service(
    layout: Layout,
    *,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    namespace: str | None = None,
    recover: bool = True,
    detached_workers: bool = True,
    scaling: bool = False,
    follow_gpus: bool = False,
    scale_interval_s: float | None = None,
    transfer_group: bool | None = None,
    **options: Any,
) -> Coordinator:
    """A coordinator in this process over worker actors; ``close()`` stops the workers.

    ``options``: the worker pool sizes (num_gpu_blocks, gpu_mem_fraction, num_cpu_blocks,
    cpu_pool_gib) and coordinator options (high_watermark, low_watermark, vocab_size,
    metrics).
    With ``recover`` and live workers in ``namespace``, their ledgers are the tables.
    ``scaling``: a ``kvservice.scaling.ScaleController`` adds and drains workers on
    request (``kvservice scale``), and with ``follow_gpus`` keeps one per GPU in the
    cluster. ``transfer_group`` (default: with ``scaling``): the workers form a
    torch.distributed group, so blocks move between them GPU to GPU.
    """
    from kvservice.workers import (
        DEFAULT_NAMESPACE,
        find_worker_actors,
        start_worker_actors,
        stop_worker_actors,
    )

    unknown = set(options) - set(_COORDINATOR_OPTIONS) - set(_WORKER_OPTIONS)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    namespace = namespace or DEFAULT_NAMESPACE
    coordinator_kwargs = {k: options[k] for k in _COORDINATOR_OPTIONS if k in options}
    worker_kwargs = {k: v for k in _WORKER_OPTIONS if (v := options.get(k)) is not None}
    found = find_worker_actors(namespace) if recover else {}
    if found:
        handles = [RayWorkerHandle(wid, actor) for wid, actor in found.items()]
        log.info("recovering from the ledgers of workers %s in %s", sorted(found), namespace)
        coordinator = Coordinator.recover(layout, handles, **coordinator_kwargs)
        stop: Callable[[], None] = lambda: _kill_actors(found.values())  # noqa: E731
    else:
        group = start_worker_actors(
            layout,
            num_workers,
            use_gpu=use_gpu,
            namespace=namespace,
            detached=detached_workers,
            **worker_kwargs,
        )
        handles = [RayWorkerHandle(wid, actor) for wid, actor in group.actors.items()]
        try:
            coordinator = Coordinator(layout, handles, **coordinator_kwargs)
        except BaseException:
            stop_worker_actors(group)
            raise
        stop = lambda: stop_worker_actors(group)  # noqa: E731
    controller = None
    if scaling:
        from kvservice.scaling import DEFAULT_INTERVAL_S, ScaleController

        controller = ScaleController(
            coordinator, layout, namespace=namespace, actors=found or group.actors,
            groups=[] if found else [group], use_gpu=_uses_gpu(use_gpu),
            follow_gpus=follow_gpus, detached=detached_workers, worker_kwargs=worker_kwargs,
            interval_s=scale_interval_s or DEFAULT_INTERVAL_S,
        )  # fmt: skip
        stop = controller.stop_workers  # the workers it added and left too
    coordinator.add_close_hook(stop)
    if scaling if transfer_group is None else transfer_group:
        try:
            coordinator.form_transfer_group()
        except Exception:  # noqa: BLE001 - blocks then move through host memory
            log.warning("the workers could not form a transfer group", exc_info=True)
    if controller is not None:
        coordinator.add_close_hook(controller.stop)  # hooks run last first: before the workers go
        controller.start()
    return coordinator


def _uses_gpu(use_gpu: bool | None) -> bool:
    import ray

    return bool(use_gpu) if use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1


def _kill_actors(actors: Any) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)


class CoordinatorActor:
    """The coordinator and its worker actors, run as one Ray actor (see module docstring)."""

    def __init__(self, layout: Layout, name: str, options: dict[str, Any]) -> None:
        options = dict(options)
        port, addr = options.pop("metrics_port", None), options.pop("metrics_addr", "0.0.0.0")
        if port:  # the coordinator's metrics live here: served from this actor's node
            from kvservice.metrics import Metrics, start_metrics_server

            options["metrics"] = Metrics()
            start_metrics_server(options["metrics"], port, addr)
        self._coordinator = start_ray_service(
            layout, namespace=worker_namespace(name), **options
        )

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """(True, result) or (False, the KVServiceError raised)."""
        try:
            return True, getattr(self._coordinator, method)(*args, **kwargs)
        except KVServiceError as exc:
            return False, exc

    def shutdown(self) -> None:
        self._coordinator.close()


def make_coordinator_actor(**ray_options: Any) -> Any:
    """``CoordinatorActor`` as a Ray actor class (threaded; no CPU reserved by default)."""
    import ray

    options = {"num_cpus": 0, "max_concurrency": ACTOR_MAX_CONCURRENCY, **ray_options}
    return ray.remote(**options)(CoordinatorActor)


def _forward(method: str) -> Callable[..., Any]:
    def call(self: RayTransport, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, args, kwargs)

    call.__name__ = method
    call.__doc__ = f"``Service.{method}`` on the coordinator actor."
    return call


class RayTransport:
    """``kvservice.api.Service`` over a coordinator actor handle."""

    def __init__(self, actor: Any, *, owned: bool = False) -> None:
        self._actor = actor
        self._owned = owned

    @classmethod
    def connect(
        cls,
        layout: Layout | str | None = None,
        *,
        address: str | None = None,
        name: str = DEFAULT_ACTOR_NAME,
        namespace: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        detached: bool = False,
        num_workers: int = 1,
        use_gpu: bool | None = None,
        ready_timeout_s: float = 120.0,
        actor_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> RayTransport:
        """Connect to actor ``name``, or start it (and its workers) when ``layout`` is given.

        ``options``: worker pool sizes and coordinator options, as for ``start_ray_service``,
        and ``metrics_port`` (with ``metrics_addr``) for a Prometheus endpoint served by the
        actor. ``actor_options``: Ray options of a started actor (e.g. its scheduling).
        """
        import ray

        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, log_to_driver=False)
        try:
            actor = ray.get_actor(name, namespace=namespace)
            owned = False
        except ValueError:
            if layout is None:
                raise Unavailable(
                    f"no kvservice coordinator actor {name!r} on this Ray cluster; give a "
                    f"layout to start one"
                ) from None
            actor_options = {**(actor_options or {}), "name": name, "get_if_exists": True}
            if namespace is not None:
                actor_options["namespace"] = namespace
            if detached:
                actor_options["lifetime"] = "detached"
            service_options = {
                "num_workers": num_workers,
                "use_gpu": use_gpu,
                "detached_workers": detached,
                **options,
            }
            actor = make_coordinator_actor().options(**actor_options).remote(
                parse_layout(layout, block_size=block_size), name, service_options
            )
            owned = not detached
        transport = cls(actor, owned=owned)
        try:
            ray.get(actor.call.remote("layout", (), {}), timeout=ready_timeout_s)
        except Exception as exc:
            if owned:
                ray.kill(actor, no_restart=True)
            raise Unavailable(f"the kvservice coordinator actor did not start: {exc}") from exc
        return transport

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import ray
        from ray.exceptions import RayActorError

        try:
            ok, value = ray.get(self._actor.call.remote(method, args, kwargs))
        except RayActorError as exc:
            raise Unavailable(f"the kvservice coordinator actor is gone: {exc}") from exc
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the coordinator actor and its workers if this client started them."""
        if not self._owned:
            return
        import ray

        self._owned = False
        try:
            ray.get(self._actor.shutdown.remote())
        finally:
            ray.kill(self._actor, no_restart=True)

    layout = _forward("layout")
    create_sequence = _forward("create_sequence")
    append_tokens = _forward("append_tokens")
    fork = _forward("fork")
    truncate = _forward("truncate")
    free = _forward("free")
    write_kv = _forward("write_kv")
    attend = _forward("attend")
    lookup_prefix = _forward("lookup_prefix")
    offload = _forward("offload")
    prefetch = _forward("prefetch")
    get_sequence = _forward("get_sequence")
    stats = _forward("stats")
    open_ticket = _forward("open_ticket")
    close_ticket = _forward("close_ticket")
