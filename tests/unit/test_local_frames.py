"""Frames of the local endpoint and the servicer context it hands out, without any socket.

A request or reply head must read back exactly what was packed, and anything a stranger
could send that is not a frame (another magic, lengths past the limits, metadata that is
not a JSON list of pairs) must be refused with ``FrameError``.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kvservice.local_frames import (
    MAGIC,
    MAX_METADATA_BYTES,
    MAX_METHOD_BYTES,
    REPLY,
    REQUEST,
    FrameError,
    ReplyHead,
    RequestHead,
    decode_metadata,
    encode_metadata,
    parse_reply_head,
    parse_request_head,
    reply_head,
    request_head,
    socket_name,
)
from kvservice.local_server import LocalContext

MAX_BODY = 1 << 20


@pytest.mark.parametrize(("timeout", "read_back"), [(None, None), (2.5, 2.5), (-3.0, 0.0)])
def test_request_head_round_trip(timeout: float | None, read_back: float | None) -> None:
    method, metadata = b"Attend", encode_metadata([("kvservice-tenant", "alice")])
    raw = request_head(2**40 + 7, timeout, method, metadata, 1234)
    assert len(raw) == REQUEST.size
    head = parse_request_head(raw, MAX_BODY)
    assert head == RequestHead(2**40 + 7, read_back, len(method), len(metadata), 1234)
    assert head.rest_len == len(method) + len(metadata) + 1234


def test_reply_head_round_trip() -> None:
    details, trailing = b"sequence 9 not found", encode_metadata([("k", "v")])
    raw = reply_head(5, grpc.StatusCode.NOT_FOUND.value[0], details, trailing, 77)
    assert len(raw) == REPLY.size
    head = parse_reply_head(raw, MAX_BODY)
    assert head == ReplyHead(5, grpc.StatusCode.NOT_FOUND.value[0], len(details), len(trailing), 77)
    assert head.rest_len == len(details) + len(trailing) + 77


def test_a_head_with_another_magic_is_refused() -> None:
    with pytest.raises(FrameError, match="not a request frame"):
        parse_request_head(REQUEST.pack(b"KVL0", 1, -1.0, 6, 0, 0), MAX_BODY)
    with pytest.raises(FrameError, match="not a reply frame"):
        parse_reply_head(REPLY.pack(b"HTTP", 1, 0, 0, 0, 0), MAX_BODY)
    # A request head is not a reply head, even with the right magic: the sizes differ.
    assert REQUEST.size != REPLY.size


@pytest.mark.parametrize(
    ("method_len", "metadata_len"),
    [(0, 0), (MAX_METHOD_BYTES + 1, 0), (6, MAX_METADATA_BYTES + 1)],
    ids=["empty-method", "long-method", "long-metadata"],
)
def test_request_lengths_past_the_limits_are_refused(method_len: int, metadata_len: int) -> None:
    raw = REQUEST.pack(MAGIC, 1, -1.0, method_len, metadata_len, 0)
    with pytest.raises(FrameError):
        parse_request_head(raw, MAX_BODY)
    # The limits themselves are accepted.
    fine = REQUEST.pack(MAGIC, 1, -1.0, MAX_METHOD_BYTES, MAX_METADATA_BYTES, 0)
    assert parse_request_head(fine, MAX_BODY).rest_len == MAX_METHOD_BYTES + MAX_METADATA_BYTES


def test_bodies_over_the_limit_are_refused() -> None:
    assert parse_request_head(request_head(1, None, b"Stats", b"", MAX_BODY), MAX_BODY).body_len
    with pytest.raises(FrameError, match="over the limit"):
        parse_request_head(request_head(1, None, b"Stats", b"", MAX_BODY + 1), MAX_BODY)
    with pytest.raises(FrameError, match="over the limit"):
        parse_reply_head(reply_head(1, 0, b"", b"", MAX_BODY + 1), MAX_BODY)
    with pytest.raises(FrameError, match="too long"):
        parse_reply_head(REPLY.pack(MAGIC, 1, 13, MAX_METADATA_BYTES + 1, 0, 0), MAX_BODY)


def test_metadata_round_trip() -> None:
    pairs = (("authorization", "Bearer tok-a"), ("kvservice-tenant", 'ålice "q"'))
    assert decode_metadata(encode_metadata(pairs)) == pairs
    assert decode_metadata(memoryview(encode_metadata(pairs))) == pairs
    assert encode_metadata([]) == b"" and decode_metadata(b"") == ()


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"null",
        b"3",
        b"[[1, 2, 3]]",
        b'{"ab": 1}',
        b'["ab", "cd"]',
        b'[["k", 1]]',
        pytest.param(
            b"[" * 50_000,
            id="deeply-nested",
        ),
    ],
)
def test_malformed_metadata_is_a_frame_error(raw: bytes) -> None:
    with pytest.raises(FrameError, match="not a JSON list of pairs"):
        decode_metadata(raw)


def test_socket_name_is_abstract_and_only_for_endpoint_addresses() -> None:
    assert socket_name("kvservice-0123abcd") == "\0kvservice-0123abcd"
    for address in ("/tmp/kvservice-0123abcd", "127.0.0.1:50051", "kvservice", ""):
        with pytest.raises(ValueError, match="not a local endpoint address"):
            socket_name(address)


def test_context_time_remaining() -> None:
    assert LocalContext((), None).time_remaining() is None
    context = LocalContext((), 5.0)
    first = context.time_remaining()
    assert first is not None and 4.0 < first <= 5.0
    time.sleep(0.05)
    second = context.time_remaining()
    assert second is not None and second < first
    assert LocalContext((), 0.0).time_remaining() == 0.0


def test_context_metadata_trailing_and_abort() -> None:
    metadata = (("authorization", "Bearer t"), ("kvservice-tenant", "bob"))
    context = LocalContext(metadata, None)
    assert context.invocation_metadata() == metadata
    assert context.trailing == ()
    context.set_trailing_metadata([("kvservice-lost-seq-ids", "1,2")])
    assert context.trailing == (("kvservice-lost-seq-ids", "1,2"),)
    with pytest.raises(Exception, match="no such sequence") as aborted:
        asyncio.run(context.abort(grpc.StatusCode.NOT_FOUND, "no such sequence"))
    assert aborted.value.code == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
