"""``kvservice.Client`` and ``kvservice.AsyncClient``: one API over three transports.

Constructors (the same on ``AsyncClient``)::

    Client.embedded(layout="tiny", *, num_workers=1, device=None, num_gpu_blocks=None,
                    gpu_mem_fraction=None, num_cpu_blocks=None, cpu_pool_gib=None,
                    block_size=16, high_watermark=0.95, low_watermark=0.85,
                    vocab_size=None, tenant=None)
        Coordinator and workers in this process (zero copy). ``layout`` is a Layout, a
        name ("tiny", "llama3-8b", ...) or "L,H,D,dtype"; ``device`` None = "cuda" when
        available, else "cpu". With no sizes given, each worker's device tier gets
        ``DEFAULT_DEVICE_TIER_GIB`` on a CPU and ``gpu_mem_fraction=0.9`` on a GPU.
    Client.ray(layout=None, *, address=None, name="kvservice", namespace=None,
               num_workers=1, use_gpu=None, num_gpu_blocks=None, gpu_mem_fraction=None,
               num_cpu_blocks=None, cpu_pool_gib=None, block_size=16,
               high_watermark=0.95, low_watermark=0.85, vocab_size=None,
               detached=False, tenant=None)
        Connects to the coordinator actor ``name`` on the Ray cluster (``ray.init(address)``
        when Ray is not initialized yet), or, when there is none and ``layout`` is given,
        starts it with ``num_workers`` worker actors. ``close()`` stops an actor this
        client started unless ``detached``.
    Client.grpc(address="127.0.0.1:50051", token=None, *, tenant=None, timeout=None,
                root_certificates=None)
        A kvservice server over gRPC; ``token`` is the bearer token (it selects the tenant
        when the server has authentication on).
    Client(service, *, tenant=None, owned=False)
        Any object with the ``kvservice.api.Service`` methods (a Coordinator, a transport),
        e.g. several clients with different tenants over one service. ``close()`` closes
        the service only when ``owned`` (the constructors above own what they build).

Methods (``kvservice.api.Service``; every one also takes ``tenant=None``, which defaults
to the client's own tenant, and that to the transport's default)::

    create_sequence(tokens, *, tenant=None) -> SequenceInfo
    append_tokens(seq_ids, tokens) -> None
    fork(seq_id, n) -> list[int]
    truncate(seq_id, length) -> None
    free(seq_ids) -> None
    write_kv(layer, seq_ids, q_lens, k, v) -> None
    attend(layer, seq_ids, q_lens, q, k_new=None, v_new=None, *, scale=None,
           sliding_window=None, return_lse=False) -> out | (out, lse)
    lookup_prefix(tokens, *, tenant=None) -> dict[worker_id, num_cached_tokens]
    offload(seq_ids) / prefetch(seq_ids) -> None
    get_sequence(seq_id) -> SequenceInfo
    stats() -> dict
    layout -> Layout (property), close(), and use as a context manager.

Step tickets (``Client`` over the embedded and Ray transports; ``kvservice.tickets``)::

    open_ticket(seq_ids, q_lens, *, writes=True, ttl_s=None) -> Ticket
        One step planned once; ``ticket.attend(layer, q, k_new, v_new)`` per layer goes
        straight to the workers (from any thread or process the ticket is handed to).
    close_ticket(ticket_id, *, commit=True) -> None
        Ends it; a writing ticket's writes of every layer are recorded when ``commit``.
    Over gRPC they are INVALID_ARGUMENT: a remote client reaches the workers only
    through the server.

Errors are the ``kvservice.errors`` classes whatever the transport: NotFound,
InvalidArgument, FailedPrecondition, ResourceExhausted, DataLoss (``.seq_ids``),
Unavailable, Unauthenticated, PermissionDenied.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Self

from kvservice.api import SequenceInfo, Service
from kvservice.core.layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["AsyncClient", "Client"]


class _Constructors:
    """``embedded`` and ``ray``, the same for both clients (each owns what it builds)."""

    if TYPE_CHECKING:  # each client's own

        def __init__(
            self, service: Any, *, tenant: str | None = None, owned: bool = False
        ) -> None: ...

    @classmethod
    def embedded(
        cls, layout: Layout | str = "tiny", *, tenant: str | None = None, **options: Any
    ) -> Self:
        from kvservice.transport_embedded import build_embedded

        return cls(build_embedded(layout, **options), tenant=tenant, owned=True)

    @classmethod
    def ray(
        cls, layout: Layout | str | None = None, *, tenant: str | None = None, **options: Any
    ) -> Self:
        from kvservice.transport_ray import RayTransport

        return cls(RayTransport.connect(layout, **options), tenant=tenant, owned=True)


class Client(_Constructors):
    """Synchronous client; see the module docstring for constructors and methods."""

    def __init__(
        self,
        service: Service,
        *,
        tenant: str | None = None,
        owned: bool = False,
    ) -> None:
        self._service = service
        self.tenant = tenant
        self._owned = owned
        self._layout: Layout | None = None
        self._closed = False

    # ------------------------------------------------------------------ constructors

    @classmethod
    def grpc(
        cls,
        address: str = "127.0.0.1:50051",
        token: str | None = None,
        *,
        tenant: str | None = None,
        **options: Any,
    ) -> Client:
        from kvservice.grpc_client import GrpcTransport

        return cls(GrpcTransport(address, token=token, **options), tenant=tenant, owned=True)

    # ------------------------------------------------------------------ plumbing

    @property
    def service(self) -> Service:
        """The transport (or Coordinator) this client calls."""
        return self._service

    def _t(self, tenant: str | None) -> dict[str, str]:
        chosen = tenant if tenant is not None else self.tenant
        return {} if chosen is None else {"tenant": chosen}

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = self._service.layout()
        return self._layout

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned:
            self._service.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the API

    def create_sequence(self, tokens: Sequence[int], *, tenant: str | None = None) -> SequenceInfo:
        return self._service.create_sequence(tokens, **self._t(tenant))

    def append_tokens(
        self,
        seq_ids: Sequence[int],
        tokens: Sequence[Sequence[int]],
        *,
        tenant: str | None = None,
    ) -> None:
        self._service.append_tokens(seq_ids, tokens, **self._t(tenant))

    def fork(self, seq_id: int, n: int, *, tenant: str | None = None) -> list[int]:
        return self._service.fork(seq_id, n, **self._t(tenant))

    def truncate(self, seq_id: int, length: int, *, tenant: str | None = None) -> None:
        self._service.truncate(seq_id, length, **self._t(tenant))

    def free(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> None:
        self._service.free(seq_ids, **self._t(tenant))

    def write_kv(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tenant: str | None = None,
    ) -> None:
        self._service.write_kv(layer, seq_ids, q_lens, k, v, **self._t(tenant))

    def attend(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
        tenant: str | None = None,
    ) -> Any:
        return self._service.attend(
            layer, seq_ids, q_lens, q, k_new, v_new,
            scale=scale, sliding_window=sliding_window, return_lse=return_lse,
            **self._t(tenant),
        )  # fmt: skip

    def lookup_prefix(self, tokens: Sequence[int], *, tenant: str | None = None) -> dict[int, int]:
        return self._service.lookup_prefix(tokens, **self._t(tenant))

    def offload(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> None:
        self._service.offload(seq_ids, **self._t(tenant))

    def prefetch(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> None:
        self._service.prefetch(seq_ids, **self._t(tenant))

    def get_sequence(self, seq_id: int, *, tenant: str | None = None) -> SequenceInfo:
        return self._service.get_sequence(seq_id, **self._t(tenant))

    def open_ticket(
        self,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        *,
        writes: bool = True,
        ttl_s: float | None = None,
        tenant: str | None = None,
    ) -> Any:
        options: dict[str, Any] = {} if ttl_s is None else {"ttl_s": ttl_s}
        return self._tickets("open_ticket")(
            seq_ids, q_lens, writes=writes, **options, **self._t(tenant)
        )

    def close_ticket(
        self, ticket_id: int, *, commit: bool = True, tenant: str | None = None
    ) -> None:
        self._tickets("close_ticket")(ticket_id, commit=commit, **self._t(tenant))

    def _tickets(self, method: str) -> Any:
        call = getattr(self._service, method, None)
        if call is None:
            from kvservice.core.errors import InvalidArgument

            raise InvalidArgument(
                "step tickets need the embedded or Ray transport: over gRPC the workers "
                "are reached only through the server"
            )
        return call

    def stats(self) -> dict[str, Any]:
        return self._service.stats()


class AsyncClient(_Constructors):
    """The same API with coroutine methods.

    Over gRPC the calls are native grpc.aio; the embedded and Ray transports are
    synchronous and run on a thread (``asyncio.to_thread``), so concurrent tasks overlap.
    """

    def __init__(
        self,
        service: Any,
        *,
        tenant: str | None = None,
        native_async: bool = False,
        owned: bool = False,
    ) -> None:
        self._service = service
        self.tenant = tenant
        self._native = native_async
        self._owned = owned
        self._layout: Layout | None = None
        self._closed = False

    @classmethod
    def grpc(
        cls,
        address: str = "127.0.0.1:50051",
        token: str | None = None,
        *,
        tenant: str | None = None,
        **options: Any,
    ) -> AsyncClient:
        from kvservice.grpc_client import AsyncGrpcTransport

        return cls(
            AsyncGrpcTransport(address, token=token, **options),
            tenant=tenant,
            native_async=True,
            owned=True,
        )

    @property
    def service(self) -> Any:
        return self._service

    def _t(self, tenant: str | None) -> dict[str, str]:
        chosen = tenant if tenant is not None else self.tenant
        return {} if chosen is None else {"tenant": chosen}

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self._service, method)
        if self._native:
            result: Awaitable[Any] = fn(*args, **kwargs)
            return await result
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def layout(self) -> Layout:
        if self._layout is None:
            self._layout = await self._call("layout")
        return self._layout

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned:
            await self._call("close")

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create_sequence(
        self, tokens: Sequence[int], *, tenant: str | None = None
    ) -> SequenceInfo:
        return await self._call("create_sequence", tokens, **self._t(tenant))

    async def append_tokens(
        self,
        seq_ids: Sequence[int],
        tokens: Sequence[Sequence[int]],
        *,
        tenant: str | None = None,
    ) -> None:
        await self._call("append_tokens", seq_ids, tokens, **self._t(tenant))

    async def fork(self, seq_id: int, n: int, *, tenant: str | None = None) -> list[int]:
        return await self._call("fork", seq_id, n, **self._t(tenant))

    async def truncate(self, seq_id: int, length: int, *, tenant: str | None = None) -> None:
        await self._call("truncate", seq_id, length, **self._t(tenant))

    async def free(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> None:
        await self._call("free", seq_ids, **self._t(tenant))

    async def write_kv(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tenant: str | None = None,
    ) -> None:
        await self._call("write_kv", layer, seq_ids, q_lens, k, v, **self._t(tenant))

    async def attend(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        q: torch.Tensor,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        return_lse: bool = False,
        tenant: str | None = None,
    ) -> Any:
        return await self._call(
            "attend", layer, seq_ids, q_lens, q, k_new, v_new,
            scale=scale, sliding_window=sliding_window, return_lse=return_lse,
            **self._t(tenant),
        )  # fmt: skip

    async def lookup_prefix(
        self, tokens: Sequence[int], *, tenant: str | None = None
    ) -> dict[int, int]:
        return await self._call("lookup_prefix", tokens, **self._t(tenant))

    async def offload(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> None:
        await self._call("offload", seq_ids, **self._t(tenant))

    async def prefetch(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> None:
        await self._call("prefetch", seq_ids, **self._t(tenant))

    async def get_sequence(self, seq_id: int, *, tenant: str | None = None) -> SequenceInfo:
        return await self._call("get_sequence", seq_id, **self._t(tenant))

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")
