"""Frames of the local channel over a socket pair (no network): tensors of every dtype
arrive bit-exact in place, and a frame that does not add up is a closed channel, never a
wrong tensor."""

from __future__ import annotations

import pickle
import socket
import struct

import pytest
import torch
from kvservice.workers.channel_frames import (
    CALL,
    HEADER,
    ChannelClosed,
    describe,
    payload_bytes,
    recv_bytes,
    recv_header,
    recv_tensors,
    send_frame,
    skip,
    torch_dtype,
)


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_a_frame_carries_its_tensors_bit_exact(pair, dtype: torch.dtype) -> None:
    a, b = pair
    q = (torch.randn(3, 4, 8) * 50).to(dtype)
    v = (torch.randn(2, 5) * 50).to(dtype).t()  # not contiguous: sent as its values
    tensors = [q, None, v]
    meta = pickle.dumps(describe(tensors))
    send_frame(a, CALL, 41, meta, tensors)
    kind, meta_len, payload, seq = recv_header(b)
    assert (kind, seq) == (CALL, 41)
    layout = pickle.loads(recv_bytes(b, meta_len))
    assert payload == payload_bytes(layout) == (q.numel() + v.numel()) * q.element_size()
    got_q, none, got_v = recv_tensors(b, layout, payload)
    assert none is None
    assert got_q.dtype == dtype and torch.equal(got_q.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got_v, v.contiguous())


def test_an_empty_frame_and_a_clean_end(pair) -> None:
    a, b = pair
    send_frame(a, CALL, 0, b"", [])
    assert recv_header(b) == (CALL, 0, 0, 0)
    a.shutdown(socket.SHUT_WR)
    assert recv_header(b) is None  # closed between frames


def test_a_frame_cut_short_is_a_closed_channel(pair) -> None:
    a, b = pair
    a.sendall(HEADER.pack(CALL, 4, 0, 1)[:10])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelClosed, match="mid-frame"):
        recv_header(b)


def test_a_payload_that_does_not_match_its_layout_is_refused(pair) -> None:
    _a, b = pair
    with pytest.raises(ChannelClosed, match="does not match"):
        recv_tensors(b, [("float32", (2, 3))], 20)


@pytest.mark.parametrize("name", ["load", "float33", "__import__", "os.system", ""])
def test_only_torch_dtypes_are_accepted(name: str) -> None:
    with pytest.raises(ChannelClosed, match="no dtype"):
        torch_dtype(name)
    assert torch_dtype("bfloat16") is torch.bfloat16


def test_skip_drops_exactly_what_it_is_told(pair) -> None:
    a, b = pair
    a.sendall(b"x" * 3000 + struct.pack("<I", 7))
    skip(b, 3000)
    assert struct.unpack("<I", recv_bytes(b, 4)) == (7,)
