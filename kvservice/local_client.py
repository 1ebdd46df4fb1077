"""Client side of the local endpoint (``kvservice.local_server``): calls over a Unix socket.

``LocalPool`` (blocking sockets) and ``AsyncLocalPool`` (an asyncio protocol) keep
connections to one endpoint, each carrying one call at a time: a call takes an idle
connection or opens one, and gives it back after the reply. Replies come back as the
API's reply messages; a failed call raises ``LocalRpcError``, a ``grpc.RpcError`` with
the same ``code()``, ``details()`` and ``trailing_metadata()`` a gRPC call's error has,
so the gRPC transport maps both the same way.

A connection whose call fails midway (deadline, cancellation, a broken socket) is
closed, not reused: the server then cancels the call, as for a gRPC client that went
away. ``EndpointUnreachable`` means no connection could be opened and nothing was
sent: the caller may send the call over gRPC instead.

``LocalRoute`` keeps a transport's choice: whether its calls go to a local endpoint,
and when to ask the server again after the endpoint could not be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from kvservice.local_frames import (
    REPLY,
    VERSION,
    FrameError,
    FrameReader,
    Metadata,
    ReplyHead,
    decode_metadata,
    parse_reply_head,
    request_head,
    socket_name,
)
from kvservice.v1 import kvservice_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["KVService"]
_REPLY_TYPES: dict[str, type[Message]] = {
    m.name: getattr(pb, m.output_type.name) for m in _SERVICE.methods
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class LocalRpcError(grpc.RpcError):
    """A failed local call, with a gRPC call error's accessors."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing


class EndpointUnreachable(OSError):
    """No connection to the endpoint could be opened; the call was not sent."""


def _lost(exc: BaseException) -> LocalRpcError:
    return LocalRpcError(
        grpc.StatusCode.UNAVAILABLE, f"lost the connection to the local endpoint: {exc}"
    )


def _deadline_exceeded() -> LocalRpcError:
    return LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


@contextlib.contextmanager
def _call_failures(close: Callable[[], None]) -> Iterator[None]:
    """A call's failures as gRPC reports them; the connection is closed, not reused, when
    the call did not end with a reply (the server then cancels it, as for a gRPC client
    that went away). A status the server replied with passes as it is."""
    try:
        yield
    except LocalRpcError:
        raise
    except TimeoutError:
        close()
        raise _deadline_exceeded() from None
    except (OSError, FrameError) as exc:
        close()
        raise _lost(exc) from None
    except BaseException:
        close()  # cancelled midway
        raise


def _request(
    call_id: int, method: str, metadata: bytes, request: Message | bytes, timeout: float | None
) -> list[bytes]:
    body = request if isinstance(request, bytes) else request.SerializeToString()
    name = method.encode()
    return [request_head(call_id, timeout, name, metadata, len(body)) + name + metadata, body]


def _reply(method: str, call_id: int, head: ReplyHead, rest: bytearray | bytes) -> Message:
    if head.call_id != call_id:
        raise FrameError(f"reply to call {head.call_id} on the connection of call {call_id}")
    view = memoryview(rest)
    if head.code != 0:
        details = bytes(view[: head.details_len]).decode(errors="replace")
        trailing = decode_metadata(view[head.details_len : head.details_len + head.trailing_len])
        raise LocalRpcError(_CODES.get(head.code, grpc.StatusCode.UNKNOWN), details, trailing)
    return _REPLY_TYPES[method].FromString(view[head.details_len + head.trailing_len :])


class LocalPool:
    """Blocking connections to one local endpoint; safe to share between threads."""

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self._name = socket_name(address)
        self._max = max_message_bytes
        self._idle: list[socket.socket] = []
        self._open: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # idle or in a call
        self._ids = itertools.count(1)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._name)
        except OSError as exc:
            sock.close()
            raise EndpointUnreachable(
                exc.errno, f"cannot reach the local endpoint: {exc}"
            ) from None
        self._open.add(sock)
        return sock

    def open(self) -> None:
        """Opens one connection now (``EndpointUnreachable`` if it cannot be)."""
        self._idle.append(self._connect())

    def _take(self) -> socket.socket:
        while True:
            try:
                sock = self._idle.pop()
            except IndexError:
                return self._connect()
            try:
                sock.settimeout(0.0)  # a socket with a timeout would wait for data to peek at
                sock.recv(1, socket.MSG_PEEK)  # b"" at EOF (the server closed it), or stray bytes
            except BlockingIOError:
                return sock  # nothing to read: alive and idle, as it should be
            except OSError:
                pass
            sock.close()

    def call(
        self, method: str, request: Message | bytes, metadata: bytes, timeout: float | None
    ) -> Message:
        sock = self._take()
        call_id = next(self._ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        with _call_failures(sock.close):
            sock.settimeout(timeout)
            _send(sock, _request(call_id, method, metadata, request, timeout))
            head = parse_reply_head(_receive(sock, REPLY.size, deadline), self._max)
            rest = _receive(sock, head.rest_len, deadline)
            try:
                reply = _reply(method, call_id, head, rest)
            except LocalRpcError:
                self._idle.append(sock)  # a status: the connection is fine
                raise
        self._idle.append(sock)
        return reply

    def close(self) -> None:
        """Closes every connection, those in a call too (their calls fail UNAVAILABLE)."""
        self._idle.clear()
        for sock in list(self._open):
            with contextlib.suppress(OSError):  # wakes a thread blocked in recv on it
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _send(sock: socket.socket, parts: Sequence[bytes]) -> None:
    """``parts`` in order, gathered by the kernel (no joined copy of a large body)."""
    views = [memoryview(part) for part in parts if part]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _receive(sock: socket.socket, size: int, deadline: float | None) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the server closed the connection")
        got += n
    return buffer


class _Connection(FrameReader[ReplyHead]):
    """One connection of an ``AsyncLocalPool``: sends a request, reads its reply frame
    straight into a buffer of the reply's size (no stream buffer to copy through)."""

    def __init__(self, max_body: int) -> None:
        super().__init__(REPLY.size)
        self._max = max_body
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[ReplyHead, bytearray]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.bad_frame(exc or ConnectionError("the server closed the connection"))

    def bad_frame(self, exc: BaseException) -> None:
        """Fails the call waiting (if any) with ``exc`` and closes the connection."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def parse_head(self, raw: bytearray) -> ReplyHead:
        if self._waiter is None:
            raise FrameError("bytes arrived with no call waiting")
        return parse_reply_head(raw, self._max)

    def frame_received(self, head: ReplyHead, rest: bytearray) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((head, rest))

    async def exchange(
        self, parts: Sequence[bytes], timeout: float | None
    ) -> tuple[ReplyHead, bytearray]:
        """Sends one request and waits for its reply (TimeoutError after ``timeout``
        seconds); the connection carries one call at a time."""
        if self.closed or self.transport is None:
            raise ConnectionError("the connection is closed")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        for part in parts:  # one write each: writelines would join (copy) them first
            self.transport.write(part)
        # A timer, not asyncio.wait_for: that wraps every call in a task of its own.
        timer = None if timeout is None else loop.call_later(timeout, self._time_out, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _time_out(self, waiter: asyncio.Future[tuple[ReplyHead, bytearray]]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncLocalPool:
    """asyncio connections to one local endpoint; use on one event loop."""

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self._name = socket_name(address)
        self._max = max_message_bytes
        self._idle: list[_Connection] = []
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()  # idle or in a call
        self._ids = itertools.count(1)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_unix_connection(
                lambda: _Connection(self._max), self._name
            )
        except OSError as exc:
            raise EndpointUnreachable(
                exc.errno, f"cannot reach the local endpoint: {exc}"
            ) from None
        self._open.add(connection)
        return connection

    async def open(self) -> None:
        """Opens one connection now (``EndpointUnreachable`` if it cannot be)."""
        self._idle.append(await self._connect())

    async def _take(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return await self._connect()

    async def call(
        self, method: str, request: Message | bytes, metadata: bytes, timeout: float | None
    ) -> Message:
        connection = await self._take()
        call_id = next(self._ids)
        with _call_failures(connection.close):
            parts = _request(call_id, method, metadata, request, timeout)
            head, rest = await connection.exchange(parts, timeout)
            try:
                reply = _reply(method, call_id, head, rest)
            except LocalRpcError:
                self._idle.append(connection)  # a status: the connection is fine
                raise
        self._idle.append(connection)
        return reply

    def close(self) -> None:
        """Closes every connection, those in a call too (their calls fail UNAVAILABLE)."""
        self._idle.clear()
        for connection in list(self._open):
            connection.close()


class LocalRoute:
    """A transport's choice of path: a pool on the local endpoint, or gRPC until ``retry_at``."""

    # After the endpoint could not be used: ask again this much later (the server may
    # have been starting, or restarted with another endpoint).
    RETRY_S = 1.0
    # The server offers none, is too old to know of it, or is on another host.
    RETRY_NONE_S = 60.0

    def __init__(self, enabled: bool) -> None:
        self.pool: Any = None
        self.retry_at = 0.0 if enabled else math.inf
        self.lock = threading.Lock()  # one discovery at a time (sync transports)

    def begin_discovery(self) -> bool:
        """Whether to ask the server for its endpoint now: none is in use, it is time,
        and no other call is asking. True holds ``lock``, which ``discovery`` releases."""
        due = self.pool is None and time.monotonic() >= self.retry_at
        return due and self.lock.acquire(blocking=False)  # never blocks (an event loop)

    @contextlib.contextmanager
    def discovery(self) -> Iterator[None]:
        """Around asking for the endpoint and opening a pool: a failure leaves the
        transport on gRPC until the retry time it calls for."""
        try:
            yield
        except grpc.RpcError as exc:
            self.retry_after_error(exc)
        except EndpointUnreachable:
            self.unreachable()
        finally:
            self.lock.release()

    def usable_address(self, reply: pb.LocalEndpoint) -> str | None:
        """The reply's address when this client speaks its frames; else wait to ask again."""
        if reply.address and reply.version == VERSION:
            return reply.address
        self.give_up(self.RETRY_NONE_S)
        return None

    def give_up(self, retry_after_s: float | None = None) -> None:
        """Back to gRPC; ask for the endpoint again after ``retry_after_s`` (default RETRY_S)."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
        if self.retry_at != math.inf:
            self.retry_at = time.monotonic() + (
                self.RETRY_S if retry_after_s is None else retry_after_s
            )

    def unreachable(self) -> None:
        """The server's endpoint cannot be reached from here (another host or network
        namespace): ask again much later, not before every second's calls."""
        self.give_up(self.RETRY_NONE_S)

    def close(self) -> None:
        """For good: the transport is closed."""
        self.give_up()
        self.retry_at = math.inf

    def retry_after_error(self, exc: grpc.RpcError) -> None:
        """``GetLocalEndpoint`` failed: an old server (UNIMPLEMENTED) is asked again much later."""
        code = exc.code() if hasattr(exc, "code") else None
        self.give_up(self.RETRY_NONE_S if code == grpc.StatusCode.UNIMPLEMENTED else None)
