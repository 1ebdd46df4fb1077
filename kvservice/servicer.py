"""The gRPC servicer: decode a request, call the service, encode the reply. Nothing more.

The service (the Coordinator, or anything with the ``kvservice.api.Service`` methods) is
synchronous and may block on workers, so by default each call runs on a thread pool, never
on the event loop; decoding and encoding tensors happens there too. Proto types stop here:
the service sees ints, lists, torch tensors and a tenant string.

Inline calls (``inline_local``, on by default): when the attached service is a Coordinator
whose every worker is a local ``Worker`` in this process, a call has nothing to wait on but
our own compute, which holds the GIL most of the time anyway; then calls without an undo
(everything but CreateSequence and Fork) run on the event-loop thread itself. That saves
the two thread hops, and more: a pool thread that slept through a long worker call wakes
slowly on a small VM. Calls with an undo keep the pool (they must outlive a client that
goes away), and so does every call of a service over Ray workers or any other service
object (waiting on ray.get on the loop would stall every client). The choice is made once,
in ``attach``, from the workers the service has then. Inline calls are checked and
reported exactly as pool calls are (deadline, status table); one runs to its end, so a
cancel that arrives meanwhile finds it done.

Errors: a ``KVServiceError`` becomes its status through the one table in
``kvservice.status``; anything else is logged and reported as INTERNAL. A call whose
deadline has passed before its turn on the pool is not started (DEADLINE_EXCEEDED), and
a call the client cancels while it waits for the pool never runs. A CreateSequence or Fork
whose client is gone (cancelled, disconnected) by the time it ends frees what it made, so
nobody is left holding blocks no client knows of.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from kvservice.api import DEFAULT_TENANT, Service
from kvservice.coordinator import Coordinator
from kvservice.core.errors import KVServiceError, Unavailable
from kvservice.decode_steps import local_handle
from kvservice.local_frames import VERSION as LOCAL_FRAMES_VERSION
from kvservice.status import status_of
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.v1 import kvservice_pb2_grpc as pb_grpc
from kvservice.wire import (
    TENANT_KEY,
    append_tokens_from_proto,
    decode_optional_tensor,
    decode_tensor,
    encode_tensor,
    layout_to_proto,
    sequence_info_to_proto,
)

log = logging.getLogger(__name__)

R = TypeVar("R")  # what a service method returns
M = TypeVar("M")  # the reply message
# Resolves a call's tenant from its invocation metadata; raises Unauthenticated or
# PermissionDenied (the token check of kvservice.auth), or returns the tenant.
TenantResolver = Callable[[Sequence[tuple[str, Any]]], str]


def workers_in_process(service: object) -> bool:
    """Whether ``service`` is a Coordinator whose every worker is a ``Worker`` in this process."""
    if not isinstance(service, Coordinator):
        return False  # a Ray-backed or wrapped service: it may block on anything
    return all(local_handle(service, wid) is not None for wid in service.worker_ids)


def tenant_from_metadata(metadata: Sequence[tuple[str, Any]]) -> str:
    """The tenant a call names in its metadata, or the default one (no authentication)."""
    for key, value in metadata:
        if key == TENANT_KEY and value:
            return str(value)
    return DEFAULT_TENANT


class _DeadlinePassed(Exception):
    pass


class KVServicer(pb_grpc.KVServiceServicer):
    """Serves ``kvservice.v1.KVService`` from a synchronous service object.

    Until ``attach`` gives it the service every call is UNAVAILABLE ("starting").
    ``inline_local``: run calls without an undo on the event loop when the service's
    workers are all in this process (see the module docstring); ``inline`` tells the choice.
    """

    def __init__(
        self,
        executor: Executor,
        service: Service | None = None,
        *,
        resolve_tenant: TenantResolver = tenant_from_metadata,
        inline_local: bool = True,
    ) -> None:
        self._executor = executor
        self._resolve_tenant = resolve_tenant
        self._inline_local = inline_local
        self._service: Service | None = None
        self.inline = False
        # The local endpoint's address, answered by GetLocalEndpoint (None: none offered).
        self.local_address: str | None = None
        if service is not None:
            self.attach(service)

    @property
    def service(self) -> Service | None:
        return self._service

    def attach(self, service: Service) -> None:
        self.inline = self._inline_local and workers_in_process(service)
        self._service = service

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        job: Callable[[Service, str], R],
        encode: Callable[[R], M],
        undo: Callable[[Service, M, str], None] | None = None,
    ) -> M:
        """``encode(job(service, tenant))`` on the pool (or inline, when chosen and there is
        no ``undo``); errors are reported as statuses.

        ``undo(service, reply, tenant)`` takes back what a call made when its client is
        gone before the reply (cancelled, disconnected): the job cannot be stopped once
        it runs, so when it ends its result is undone instead of leaked.
        """
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            tenant = self._resolve_tenant(context.invocation_metadata() or ())
            if undo is None and self.inline:
                return self._guarded(deadline, job, encode, tenant)
            ran_on: list[Service] = []
            if undo is not None:
                job = _noting_service(job, ran_on)
            work = functools.partial(self._guarded, deadline, job, encode, tenant)
            future = asyncio.get_running_loop().run_in_executor(self._executor, work)
            if undo is None:
                return await future
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                future.add_done_callback(functools.partial(self._undo, undo, ran_on, tenant))
                raise
        except KVServiceError as exc:
            code, details, trailing = status_of(exc)
            if trailing:
                context.set_trailing_metadata(trailing)
            await context.abort(code, details)
        except _DeadlinePassed:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call started"
            )
        except Exception as exc:
            log.exception("internal error serving a KVService call")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            )
        raise AssertionError("unreachable: abort raises")

    def _undo(
        self,
        undo: Callable[[Service, M, str], None],
        ran_on: list[Service],
        tenant: str,
        future: asyncio.Future[M],
    ) -> None:
        if future.cancelled() or future.exception() is not None or not ran_on:
            return  # nothing was made
        reply = future.result()

        def run() -> None:
            try:
                undo(ran_on[0], reply, tenant)
            except Exception:
                log.exception("could not undo the call of a client that went away")

        try:
            self._executor.submit(run)
        except RuntimeError:  # the pool is shut down: the server is stopping
            run()

    def _guarded(
        self,
        deadline: float | None,
        job: Callable[[Service, str], R],
        encode: Callable[[R], M],
        tenant: str,
    ) -> M:
        if deadline is not None and time.monotonic() >= deadline:
            raise _DeadlinePassed
        service = self._service
        if service is None:
            raise Unavailable("the service is starting: workers are not up yet")
        return encode(job(service, tenant))

    async def CreateSequence(
        self, request: pb.CreateSequenceRequest, context: Any
    ) -> pb.SequenceInfo:
        tokens = list(request.tokens)
        return await self._run(
            context,
            lambda s, tenant: s.create_sequence(tokens, tenant=tenant),
            sequence_info_to_proto,
            undo=lambda s, reply, tenant: s.free([reply.seq_id], tenant=tenant),
        )

    async def AppendTokens(
        self, request: pb.AppendTokensRequest, context: Any
    ) -> pb.AppendTokensResponse:
        # A slice of a repeated field is a list, made at about half the cost of list().
        seq_ids = request.seq_ids[:]
        return await self._run(
            context,
            lambda s, tenant: s.append_tokens(
                seq_ids, append_tokens_from_proto(request), tenant=tenant
            ),
            _empty(pb.AppendTokensResponse),
        )

    async def Fork(self, request: pb.ForkRequest, context: Any) -> pb.ForkResponse:
        return await self._run(
            context,
            lambda s, tenant: s.fork(request.seq_id, request.n, tenant=tenant),
            lambda child_ids: pb.ForkResponse(child_ids=child_ids),
            undo=lambda s, reply, tenant: s.free(list(reply.child_ids), tenant=tenant),
        )

    async def Truncate(self, request: pb.TruncateRequest, context: Any) -> pb.TruncateResponse:
        return await self._run(
            context,
            lambda s, tenant: s.truncate(request.seq_id, request.length, tenant=tenant),
            _empty(pb.TruncateResponse),
        )

    async def Free(self, request: pb.FreeRequest, context: Any) -> pb.FreeResponse:
        seq_ids = list(request.seq_ids)
        return await self._run(
            context, lambda s, tenant: s.free(seq_ids, tenant=tenant), _empty(pb.FreeResponse)
        )

    async def WriteKV(self, request: pb.WriteKVRequest, context: Any) -> pb.WriteKVResponse:
        def job(s: Service, tenant: str) -> None:
            k = decode_tensor(request.k, "k")
            v = decode_tensor(request.v, "v")
            s.write_kv(
                request.layer, list(request.seq_ids), list(request.q_lens), k, v, tenant=tenant
            )

        return await self._run(context, job, _empty(pb.WriteKVResponse))

    async def Attend(self, request: pb.AttendRequest, context: Any) -> pb.AttendResponse:
        def job(s: Service, tenant: str) -> Any:
            return s.attend(
                request.layer,
                list(request.seq_ids),
                list(request.q_lens),
                decode_tensor(request.q, "q"),
                decode_optional_tensor(request, "k_new"),
                decode_optional_tensor(request, "v_new"),
                scale=request.scale if request.HasField("scale") else None,
                sliding_window=(
                    request.sliding_window if request.HasField("sliding_window") else None
                ),
                return_lse=request.return_lse,
                tenant=tenant,
            )

        def encode(result: Any) -> pb.AttendResponse:
            reply = pb.AttendResponse()
            out, lse = result if request.return_lse else (result, None)
            encode_tensor(out, reply.out)
            if lse is not None:
                encode_tensor(lse, reply.lse)
            return reply

        return await self._run(context, job, encode)

    async def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: Any
    ) -> pb.LookupPrefixResponse:
        tokens = list(request.tokens)
        return await self._run(
            context,
            lambda s, tenant: s.lookup_prefix(tokens, tenant=tenant),
            lambda found: pb.LookupPrefixResponse(num_cached_tokens=found),
        )

    async def Offload(self, request: pb.OffloadRequest, context: Any) -> pb.OffloadResponse:
        seq_ids = list(request.seq_ids)
        return await self._run(
            context, lambda s, tenant: s.offload(seq_ids, tenant=tenant), _empty(pb.OffloadResponse)
        )

    async def Prefetch(self, request: pb.PrefetchRequest, context: Any) -> pb.PrefetchResponse:
        seq_ids = list(request.seq_ids)
        return await self._run(
            context,
            lambda s, tenant: s.prefetch(seq_ids, tenant=tenant),
            _empty(pb.PrefetchResponse),
        )

    async def GetSequence(self, request: pb.GetSequenceRequest, context: Any) -> pb.SequenceInfo:
        return await self._run(
            context,
            lambda s, tenant: s.get_sequence(request.seq_id, tenant=tenant),
            sequence_info_to_proto,
        )

    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        # JSON turns int keys (worker ids) into strings; values keep int vs float.
        return await self._run(
            context,
            lambda s, _tenant: s.stats(),
            lambda stats: pb.StatsResponse(json=json.dumps(stats, default=str)),
        )

    async def GetLayout(self, request: pb.GetLayoutRequest, context: Any) -> pb.Layout:
        return await self._run(context, lambda s, _tenant: s.layout(), layout_to_proto)

    async def GetLocalEndpoint(
        self, request: pb.GetLocalEndpointRequest, context: Any
    ) -> pb.LocalEndpoint:
        # Answered while starting too: the endpoint serves (UNAVAILABLE) as gRPC does.
        if self.local_address is None:
            return pb.LocalEndpoint()
        return pb.LocalEndpoint(address=self.local_address, version=LOCAL_FRAMES_VERSION)


def _noting_service(
    job: Callable[[Service, str], R], ran_on: list[Service]
) -> Callable[[Service, str], R]:
    """``job``, noting the service it ran on (an undo must go to that same service)."""

    def noted(service: Service, tenant: str) -> R:
        ran_on.append(service)
        return job(service, tenant)

    return noted


def _empty(reply_type: Callable[[], M]) -> Callable[[object], M]:
    """An encoder for calls that answer nothing: the empty reply message."""
    return lambda _result: reply_type()
