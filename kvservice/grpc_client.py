"""The gRPC client transport: the ``kvservice.api.Service`` methods over KVService stubs.

``GrpcTransport`` is synchronous; ``AsyncGrpcTransport`` has the same methods, each
returning an awaitable (grpc.aio). Both share every request builder and reply parser:
the methods are written once, in ``_Calls``, over one ``_invoke`` that each transport
implements. Status codes from the table in ``kvservice.status`` come back as the same
exception classes the in-process service raises (DATA_LOSS with its sequence ids); other
codes (DEADLINE_EXCEEDED, CANCELLED, ...) stay ``grpc.RpcError``.

The tenant travels as ``kvservice-tenant`` metadata and a token as
``authorization: Bearer``; give ``root_certificates`` (PEM) for TLS. ``timeout`` is the
default deadline of every call, in seconds.

WriteKV and Attend requests carry tensors of up to many MiB: they are serialized here
(``kvservice.wire.serialize_with_tensors``, one copy of each tensor's bytes) and go
out through a method that sends those bytes as they are.

Clients on the server's host send their calls to the server's local endpoint instead
(``kvservice.local_server``: the same messages over a Unix socket, a fraction of gRPC's
time per call). A transport asks for it with ``GetLocalEndpoint`` on its first call and
uses it when it can connect; otherwise, or with ``local_endpoint=False`` (or
``KVSERVICE_LOCAL_ENDPOINT=0`` in the environment), every call stays on gRPC. Errors
and deadlines are the same either way.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import torch

from kvservice.api import DEFAULT_TENANT
from kvservice.local_client import AsyncLocalPool, EndpointUnreachable, LocalPool, LocalRoute
from kvservice.local_frames import encode_metadata
from kvservice.status import error_from_status
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.v1 import kvservice_pb2_grpc as pb_grpc
from kvservice.wire import (
    MAX_MESSAGE_BYTES,
    TENANT_KEY,
    append_tokens_to_proto,
    decode_tensor,
    layout_from_proto,
    message_options,
    sequence_info_from_proto,
    serialize_with_tensors,
)

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

_SERVICE = pb.DESCRIPTOR.services_by_name["KVService"]
# Methods whose requests ``_Calls`` serializes itself, with their reply types.
_PRESERIALIZED = {"WriteKV": pb.WriteKVResponse, "Attend": pb.AttendResponse}
LOCAL_ENDPOINT_ENV = "KVSERVICE_LOCAL_ENDPOINT"
# Asking the server for its local endpoint waits at most this long (then: gRPC for now).
_DISCOVERY_TIMEOUT_S = 5.0


def local_endpoint_default() -> bool:
    """Whether transports use a local endpoint unless told: yes, but for ``KVSERVICE_LOCAL_ENDPOINT=0``."""
    return os.environ.get(LOCAL_ENDPOINT_ENV, "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def _none(_reply: Any) -> None:
    return None


def _attend_result(return_lse: bool) -> Callable[[pb.AttendResponse], Any]:
    def parse(reply: pb.AttendResponse) -> Any:
        out = decode_tensor(reply.out, "out")
        return (out, decode_tensor(reply.lse, "lse")) if return_lse else out

    return parse


def _as_kvservice_error(exc: grpc.RpcError) -> BaseException:
    """The kvservice error a failed call stands for, or the RpcError itself."""
    # Sync calls raise a grpc.Call, grpc.aio an AioRpcError: both have these methods.
    if not hasattr(exc, "code"):
        return exc
    trailing = exc.trailing_metadata() or ()
    mapped = error_from_status(exc.code(), exc.details() or "", trailing)
    return exc if mapped is None else mapped


class _Calls:
    """Every service method, built on ``_invoke(rpc, request, tenant, parse)``."""

    # The module that opens channels: grpc or grpc.aio (the same functions, blocking or asyncio).
    _channels: Any = None

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        local_endpoint: bool | None = None,
    ) -> None:
        self._token = token
        self._timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._metadata_by_tenant: dict[str, Metadata] = {}
        self._local_metadata_by_tenant: dict[str | None, bytes] = {}
        self._route = LocalRoute(
            local_endpoint_default() if local_endpoint is None else local_endpoint
        )
        options = message_options(max_message_bytes)
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = self._channels.secure_channel(address, credentials, options=options)
        else:
            self._channel = self._channels.insecure_channel(address, options=options)
        stub = pb_grpc.KVServiceStub(self._channel)
        self._methods: dict[str, Any] = {
            name: getattr(stub, name) for name in _SERVICE.methods_by_name
        }
        for name, reply_type in _PRESERIALIZED.items():
            self._methods[name] = self._channel.unary_unary(
                f"/{_SERVICE.full_name}/{name}",
                request_serializer=None,  # the request is bytes already
                response_deserializer=reply_type.FromString,
                _registered_method=True,
            )

    def _metadata(self, tenant: str | None) -> Metadata:
        # The default tenant is not named: the server then uses the caller's own tenant
        # (the token's, with authentication on; "default" without).
        tenant = tenant or DEFAULT_TENANT
        metadata = self._metadata_by_tenant.get(tenant)
        if metadata is None:
            pairs = [] if tenant == DEFAULT_TENANT else [(TENANT_KEY, tenant)]
            if self._token is not None:
                pairs.append(("authorization", f"Bearer {self._token}"))
            metadata = self._metadata_by_tenant[tenant] = tuple(pairs)
        return metadata

    def _local_metadata(self, tenant: str | None) -> bytes:
        raw = self._local_metadata_by_tenant.get(tenant)
        if raw is None:
            raw = self._local_metadata_by_tenant[tenant] = encode_metadata(self._metadata(tenant))
        return raw

    def _discovery_options(self) -> dict[str, Any]:
        """Deadline and metadata of the ``GetLocalEndpoint`` call (the default tenant's)."""
        timeout = (
            _DISCOVERY_TIMEOUT_S
            if self._timeout is None
            else min(self._timeout, _DISCOVERY_TIMEOUT_S)
        )
        return {"timeout": timeout, "metadata": self._metadata(None)}

    @property
    def on_local_endpoint(self) -> bool:
        """Whether calls go to the server's local endpoint now (known after the first call)."""
        return self._route.pool is not None

    def _invoke(self, rpc: str, request: Any, tenant: str | None, parse: Callable[[Any], T]) -> Any:
        raise NotImplementedError

    def layout(self) -> Any:
        return self._invoke("GetLayout", pb.GetLayoutRequest(), None, layout_from_proto)

    def create_sequence(self, tokens: Sequence[int], *, tenant: str | None = None) -> Any:
        request = pb.CreateSequenceRequest(tokens=tokens)
        return self._invoke("CreateSequence", request, tenant, sequence_info_from_proto)

    def append_tokens(
        self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]], *, tenant: str | None = None
    ) -> Any:
        request = append_tokens_to_proto(seq_ids, tokens)
        return self._invoke("AppendTokens", request, tenant, _none)

    def fork(self, seq_id: int, n: int, *, tenant: str | None = None) -> Any:
        request = pb.ForkRequest(seq_id=seq_id, n=n)
        return self._invoke("Fork", request, tenant, lambda reply: list(reply.child_ids))

    def truncate(self, seq_id: int, length: int, *, tenant: str | None = None) -> Any:
        request = pb.TruncateRequest(seq_id=seq_id, length=length)
        return self._invoke("Truncate", request, tenant, _none)

    def free(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> Any:
        return self._invoke("Free", pb.FreeRequest(seq_ids=seq_ids), tenant, _none)

    def write_kv(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q_lens: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tenant: str | None = None,
    ) -> Any:
        request = serialize_with_tensors(
            pb.WriteKVRequest(layer=layer, seq_ids=seq_ids, q_lens=q_lens),
            {pb.WriteKVRequest.K_FIELD_NUMBER: k, pb.WriteKVRequest.V_FIELD_NUMBER: v},
        )
        return self._invoke("WriteKV", request, tenant, _none)

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
        header = pb.AttendRequest(
            layer=layer,
            seq_ids=seq_ids,
            q_lens=q_lens,
            scale=scale,
            sliding_window=sliding_window,
            return_lse=return_lse,
        )
        request = serialize_with_tensors(
            header,
            {
                pb.AttendRequest.Q_FIELD_NUMBER: q,
                pb.AttendRequest.K_NEW_FIELD_NUMBER: k_new,
                pb.AttendRequest.V_NEW_FIELD_NUMBER: v_new,
            },
        )
        return self._invoke("Attend", request, tenant, _attend_result(return_lse))

    def lookup_prefix(self, tokens: Sequence[int], *, tenant: str | None = None) -> Any:
        request = pb.LookupPrefixRequest(tokens=tokens)
        return self._invoke(
            "LookupPrefix", request, tenant, lambda reply: dict(reply.num_cached_tokens)
        )

    def offload(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> Any:
        return self._invoke("Offload", pb.OffloadRequest(seq_ids=seq_ids), tenant, _none)

    def prefetch(self, seq_ids: Sequence[int], *, tenant: str | None = None) -> Any:
        return self._invoke("Prefetch", pb.PrefetchRequest(seq_ids=seq_ids), tenant, _none)

    def get_sequence(self, seq_id: int, *, tenant: str | None = None) -> Any:
        request = pb.GetSequenceRequest(seq_id=seq_id)
        return self._invoke("GetSequence", request, tenant, sequence_info_from_proto)

    def stats(self) -> Any:
        return self._invoke("Stats", pb.StatsRequest(), None, lambda reply: json.loads(reply.json))


class GrpcTransport(_Calls):
    """Synchronous client of a kvservice gRPC server (``kvservice.api.Service``)."""

    _channels = grpc

    def _invoke(self, rpc: str, request: Any, tenant: str | None, parse: Callable[[Any], T]) -> T:
        try:
            pool = self._local_pool()
            reply = None
            if pool is not None:
                try:
                    reply = pool.call(rpc, request, self._local_metadata(tenant), self._timeout)
                except EndpointUnreachable:
                    self._route.give_up()  # nothing was sent: this call goes over gRPC
            if reply is None:
                reply = self._methods[rpc](
                    request, timeout=self._timeout, metadata=self._metadata(tenant)
                )
        except grpc.RpcError as exc:
            raise _as_kvservice_error(exc) from None
        return parse(reply)

    def _local_pool(self) -> LocalPool | None:
        route = self._route
        if route.begin_discovery():
            with route.discovery():
                reply = self._methods["GetLocalEndpoint"](
                    pb.GetLocalEndpointRequest(), **self._discovery_options()
                )
                address = route.usable_address(reply)
                if address is not None:
                    pool = LocalPool(address, self._max_message_bytes)
                    pool.open()
                    route.pool = pool
        return route.pool  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until the channel is connected (grpc.FutureTimeoutError on timeout)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def close(self) -> None:
        self._route.close()
        self._channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGrpcTransport(_Calls):
    """asyncio client (grpc.aio); every method returns an awaitable. Use on one event loop."""

    _channels = grpc.aio

    async def _invoke(  # type: ignore[override]
        self, rpc: str, request: Any, tenant: str | None, parse: Callable[[Any], T]
    ) -> T:
        try:
            pool = await self._local_pool()
            reply = None
            if pool is not None:
                try:
                    reply = await pool.call(
                        rpc, request, self._local_metadata(tenant), self._timeout
                    )
                except EndpointUnreachable:
                    self._route.give_up()  # nothing was sent: this call goes over gRPC
            if reply is None:
                reply = await self._methods[rpc](
                    request, timeout=self._timeout, metadata=self._metadata(tenant)
                )
        except grpc.RpcError as exc:
            raise _as_kvservice_error(exc) from None
        return parse(reply)

    async def _local_pool(self) -> AsyncLocalPool | None:
        route = self._route
        if route.begin_discovery():
            with route.discovery():
                reply = await self._methods["GetLocalEndpoint"](
                    pb.GetLocalEndpointRequest(), **self._discovery_options()
                )
                address = route.usable_address(reply)
                if address is not None:
                    pool = AsyncLocalPool(address, self._max_message_bytes)
                    await pool.open()
                    route.pool = pool
        return route.pool  # type: ignore[no-any-return]

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def close(self) -> None:  # type: ignore[override]
        self._route.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncGrpcTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
