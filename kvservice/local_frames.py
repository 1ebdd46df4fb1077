"""Frames of the local endpoint: KVService calls over a Unix socket on the server's host.

A call is one request frame and one reply frame, each a fixed header followed by its parts:

    request: REQUEST header | method name | metadata | request message
    reply:   REPLY header   | details     | trailing metadata | reply message

Messages are the gRPC API's own protobuf messages, serialized as gRPC would; metadata is
a JSON list of ``[key, value]`` pairs (what gRPC carries as headers); names and details
are UTF-8. A request carries its deadline as the seconds left when it was sent (negative:
none) and an id the reply repeats, so one connection may carry several calls at once.
``code`` is the gRPC status code's number (0 is OK). Nothing is pickled: a frame from a
stranger can at worst be refused.

Every frame starts with ``MAGIC``; a peer that reads anything else, or lengths past
the limits, closes the connection (there is no way to find the next frame).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

VERSION = 1
MAGIC = b"KVL1"
# magic, call id, seconds left (< 0: no deadline), method length, metadata length, body length
REQUEST = struct.Struct("<4sQdHIQ")
# magic, call id, status code, details length, trailing metadata length, body length
REPLY = struct.Struct("<4sQHIIQ")
MAX_METHOD_BYTES = 128
MAX_METADATA_BYTES = 64 * 1024
ABSTRACT_PREFIX = "kvservice-"

Metadata = tuple[tuple[str, str], ...]


class FrameError(Exception):
    """A frame that cannot be read: the connection it came on must be closed."""


class RequestHead(NamedTuple):
    call_id: int
    timeout_s: float | None
    method_len: int
    metadata_len: int
    body_len: int

    @property
    def rest_len(self) -> int:
        return self.method_len + self.metadata_len + self.body_len


class ReplyHead(NamedTuple):
    call_id: int
    code: int
    details_len: int
    trailing_len: int
    body_len: int

    @property
    def rest_len(self) -> int:
        return self.details_len + self.trailing_len + self.body_len


def encode_metadata(pairs: Sequence[tuple[str, str]]) -> bytes:
    return json.dumps([[k, v] for k, v in pairs]).encode() if pairs else b""


def decode_metadata(raw: bytes | bytearray | memoryview) -> Metadata:
    if not raw:
        return ()
    try:
        pairs = json.loads(bytes(raw))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's depth
        raise FrameError(f"metadata is not a JSON list of pairs: {exc}") from None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise FrameError("metadata is not a JSON list of pairs of strings")
    return tuple((k, v) for k, v in pairs)


def request_head(
    call_id: int, timeout_s: float | None, method: bytes, metadata: bytes, body_len: int
) -> bytes:
    timeout = -1.0 if timeout_s is None else max(timeout_s, 0.0)
    return REQUEST.pack(MAGIC, call_id, timeout, len(method), len(metadata), body_len)


def parse_request_head(raw: bytes | bytearray | memoryview, max_body: int) -> RequestHead:
    magic, call_id, timeout, method_len, metadata_len, body_len = REQUEST.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"not a request frame (magic {bytes(magic)!r})")
    if not 0 < method_len <= MAX_METHOD_BYTES or metadata_len > MAX_METADATA_BYTES:
        raise FrameError(
            f"method ({method_len} B) empty or too long, or metadata ({metadata_len} B) too long"
        )
    if body_len > max_body:
        raise FrameError(f"request of {body_len} bytes is over the limit of {max_body}")
    return RequestHead(
        call_id, None if timeout < 0 else timeout, method_len, metadata_len, body_len
    )


def reply_head(call_id: int, code: int, details: bytes, trailing: bytes, body_len: int) -> bytes:
    return REPLY.pack(MAGIC, call_id, code, len(details), len(trailing), body_len)


def parse_reply_head(raw: bytes | bytearray | memoryview, max_body: int) -> ReplyHead:
    magic, call_id, code, details_len, trailing_len, body_len = REPLY.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"not a reply frame (magic {bytes(magic)!r})")
    if details_len > MAX_METADATA_BYTES or trailing_len > MAX_METADATA_BYTES:
        raise FrameError(
            f"details ({details_len} B) or trailing metadata ({trailing_len} B) too long"
        )
    if body_len > max_body:
        raise FrameError(f"reply of {body_len} bytes is over the limit of {max_body}")
    return ReplyHead(call_id, code, details_len, trailing_len, body_len)


def socket_name(address: str) -> str:
    """The ``bind``/``connect`` name of an abstract-namespace address (leading NUL)."""
    if not address.startswith(ABSTRACT_PREFIX):
        raise ValueError(f"not a local endpoint address: {address!r}")
    return "\0" + address


class _Head(Protocol):
    @property
    def rest_len(self) -> int: ...


H = TypeVar("H", bound=_Head)


class FrameReader(asyncio.BufferedProtocol, Generic[H]):
    """Reads frames (a fixed-size head, then the rest whose length the head gives) off a
    socket, each rest straight into a buffer of its own size: nothing is copied through a
    stream buffer. Both ends of a connection read with it; a subclass says how a head
    parses (``parse_head``, raising ``FrameError``), what a whole frame does
    (``frame_received``) and what a frame that cannot be read does (``bad_frame``)."""

    def __init__(self, head_size: int) -> None:
        self._head_buffer = bytearray(head_size)
        self._head: H | None = None  # set while the rest of a frame is read
        self._rest = bytearray()
        self._target = memoryview(self._head_buffer)
        self._filled = 0

    def parse_head(self, raw: bytearray) -> H:
        raise NotImplementedError

    def frame_received(self, head: H, rest: bytearray) -> None:
        raise NotImplementedError

    def bad_frame(self, exc: FrameError) -> None:
        raise NotImplementedError

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        self._filled = 0
        if self._head is None:
            try:
                head = self.parse_head(self._head_buffer)
            except FrameError as exc:
                self.bad_frame(exc)
                return
            if head.rest_len:
                self._head, self._rest = head, bytearray(head.rest_len)
                self._target = memoryview(self._rest)
                return
            rest = bytearray()
        else:
            head, rest = self._head, self._rest
            self._head = None
            self._target = memoryview(self._head_buffer)
        self.frame_received(head, rest)
