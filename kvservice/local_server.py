"""The local endpoint: the gRPC servicer's calls over a Unix socket, for clients on its host.

Why: on a small host Python's gRPC takes ~1.3 ms of two cores' time per unary call with
an Attend's payloads (HTTP/2 framing, its completion-queue threads, two event loops'
hand-offs), about as much as a whole decode step's attention. The same bytes over a
Unix socket into the server's event loop take ~0.4 ms. So the server also listens on an
abstract-namespace socket under a random name, which ``GetLocalEndpoint`` hands to
clients (with a token, when authentication is on); clients that can connect to it send
their calls there (``kvservice.local_client``), the others stay on gRPC.

The endpoint adds no semantics of its own: each call is parsed into the API's request
message and handed to the very ``KVServicer`` method gRPC calls, with a context that
offers what the servicer uses of grpc's (metadata, deadline, trailing metadata, abort).
So status codes, tenants, tokens (checked before the request is parsed, as the gRPC
interceptor does) and deadlines mean what they mean over gRPC, and a malformed request
is INVALID_ARGUMENT. A connection that closes cancels its calls in flight, as a gRPC
client that goes away does (a CreateSequence or Fork that still ends then frees what it
made). ``stop(grace)`` refuses new calls with UNAVAILABLE and gives the others ``grace``
seconds.

Framing is ``kvservice.local_frames``; a connection that sends a frame that cannot be
read is closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from kvservice.core.errors import KVServiceError
from kvservice.local_frames import (
    ABSTRACT_PREFIX,
    REQUEST,
    FrameError,
    FrameReader,
    Metadata,
    RequestHead,
    decode_metadata,
    encode_metadata,
    parse_request_head,
    reply_head,
    socket_name,
)
from kvservice.status import status_of
from kvservice.v1 import kvservice_pb2 as pb

log = logging.getLogger(__name__)

Handler = Callable[[Message, Any], Awaitable[Message]]
# Raises a KVServiceError (UNAUTHENTICATED, PERMISSION_DENIED) for metadata it refuses.
MetadataCheck = Callable[[Sequence[tuple[str, Any]]], object]

_SERVICE = pb.DESCRIPTOR.services_by_name["KVService"]
# Calls one connection may have in flight before the endpoint stops reading from it.
MAX_CALLS_PER_CONNECTION = 64


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LocalContext:
    """What the servicer uses of ``grpc.aio.ServicerContext``, for one local call."""

    def __init__(self, metadata: Metadata, timeout_s: float | None) -> None:
        self._metadata = metadata
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)


class LocalEndpoint:
    """Serves ``servicer``'s KVService methods on an abstract Unix socket; see the module doc."""

    def __init__(
        self,
        servicer: object,
        *,
        max_message_bytes: int,
        check_metadata: MetadataCheck | None = None,
    ) -> None:
        self.address = ABSTRACT_PREFIX + secrets.token_hex(16)
        self.max_message_bytes = max_message_bytes
        self._check_metadata = check_metadata
        self._methods: dict[bytes, tuple[Handler, type[Message]]] = {
            m.name.encode(): (getattr(servicer, m.name), getattr(pb, m.input_type.name))
            for m in _SERVICE.methods
        }
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), path=socket_name(self.address)
        )

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls (UNAVAILABLE), give those in flight ``grace`` seconds, close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        # In flight: the calls of live connections (those of closed ones are cancelled).
        calls = set().union(*(connection.calls for connection in self._connections))
        if calls and grace is not None and grace > 0:  # None: end them now, as grpc.aio
            await asyncio.wait(calls, timeout=grace)
        for connection in list(self._connections):
            connection.close()  # cancels what is still running
        if self._server is not None:
            await self._server.wait_closed()

    async def serve(self, head: RequestHead, rest: bytearray, connection: _Connection) -> None:
        """Runs one call and sends its reply on ``connection``."""
        view = memoryview(rest)
        context = LocalContext((), head.timeout_s)
        code, details, body = grpc.StatusCode.OK, "", b""
        try:
            if self._stopping:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
            metadata_end = head.method_len + head.metadata_len
            context = LocalContext(
                decode_metadata(view[head.method_len : metadata_end]), head.timeout_s
            )
            if self._check_metadata is not None:  # first, as gRPC's interceptor does
                self._check_metadata(context.invocation_metadata())
            method = bytes(view[: head.method_len])
            entry = self._methods.get(method)
            if entry is None:
                raise _Abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
            handler, request_type = entry
            try:
                request = request_type.FromString(view[metadata_end:])
            except DecodeError as exc:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"
                ) from None
            body = (await handler(request, context)).SerializeToString()
        except _Abort as exc:
            code, details = exc.code, exc.details
        except KVServiceError as exc:  # the metadata check's refusal
            code, details, _ = status_of(exc)
        except FrameError as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception as exc:
            log.exception("internal error serving a local KVService call")
            code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        raw_details = details.encode()
        trailing = encode_metadata(context.trailing)
        head_bytes = reply_head(head.call_id, code.value[0], raw_details, trailing, len(body))
        connection.send((head_bytes + raw_details + trailing, body))


class _Connection(FrameReader[RequestHead]):
    """One client connection: reads request frames into their own buffers, runs each as a task."""

    def __init__(self, endpoint: LocalEndpoint) -> None:
        super().__init__(REQUEST.size)
        self._endpoint = endpoint
        self._transport: asyncio.Transport | None = None
        self.calls: set[asyncio.Task[None]] = set()
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._endpoint._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._endpoint._connections.discard(self)
        for call in list(self.calls):
            call.cancel()  # the client is gone: as a gRPC call whose client went away

    def parse_head(self, raw: bytearray) -> RequestHead:
        return parse_request_head(raw, self._endpoint.max_message_bytes)

    def bad_frame(self, exc: FrameError) -> None:
        log.warning("closing a local connection: %s", exc)
        self.close()

    def frame_received(self, head: RequestHead, rest: bytearray) -> None:
        self._dispatch(head, rest)

    def _dispatch(self, head: RequestHead, rest: bytearray) -> None:
        call = asyncio.get_running_loop().create_task(self._endpoint.serve(head, rest, self))
        self.calls.add(call)
        call.add_done_callback(self._call_done)
        if len(self.calls) >= MAX_CALLS_PER_CONNECTION and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

    def _call_done(self, call: asyncio.Task[None]) -> None:
        self.calls.discard(call)
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._paused = False

    def send(self, parts: Sequence[bytes]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            for part in parts:  # one write each: writelines would join (copy) them first
                if part:
                    self._transport.write(part)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
