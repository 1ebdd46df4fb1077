"""Frames of the local channel (``kvservice.workers.channel``): a step ticket's attention
calls over a Unix socket between processes of one host.

A frame is a fixed header (its kind or status, the lengths of its two parts and the
call's sequence number), a small pickled *meta* part, and a *payload* of raw tensor bytes
laid end to end. Tensors travel as bytes, never pickled: the receiver reads each one
straight into the memory it ends up in (pinned memory on a GPU worker, the output tensor
on the client), and the sender writes them from where they lie, in one ``sendmsg``.
"""

from __future__ import annotations

import functools
import math
import socket
import struct
from collections.abc import Sequence

import torch

# kind (requests) or status (replies), meta bytes, payload bytes, sequence number.
HEADER = struct.Struct("<B7xQQQ")
CALL = 1  # a request: an attention call
OK = 0  # a reply: the result's tensors
ERROR = 1  # a reply: the exception the call raised (pickled)
# Socket buffers large enough that a decode call's q or output goes in one piece.
SOCKET_BUFFER_BYTES = 4 << 20


class ChannelClosed(ConnectionError):
    """The other end went away mid-frame or between frames."""


def describe(tensors: Sequence[torch.Tensor | None]) -> list[tuple[str, tuple[int, ...]] | None]:
    """Each tensor's (dtype name, shape), None for an absent one: what the reader needs
    to lay the payload out again."""
    return [
        None if t is None else (str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for t in tensors
    ]


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def payload_bytes(layout: Sequence[tuple[str, tuple[int, ...]] | None]) -> int:
    total = 0
    for entry in layout:
        if entry is not None:
            dtype, shape = entry
            total += math.prod(shape) * torch_dtype(dtype).itemsize
    return total


def send_frame(
    sock: socket.socket, kind: int, seq: int, meta: bytes, tensors: Sequence[torch.Tensor | None]
) -> None:
    """One frame: header, meta and every present tensor's bytes."""
    buffers = [as_bytes(t) for t in tensors if t is not None]
    payload = sum(b.nbytes for b in buffers)
    parts = [memoryview(HEADER.pack(kind, len(meta), payload, seq)), memoryview(meta), *buffers]
    total = sum(p.nbytes for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:  # a partial write (a signal, a full buffer): the rest in order
        for part in parts:
            if sent >= part.nbytes:
                sent -= part.nbytes
                continue
            sock.sendall(part[sent:])
            sent = 0


def recv_header(sock: socket.socket) -> tuple[int, int, int, int] | None:
    """(kind or status, meta bytes, payload bytes, sequence number); None at a clean end
    (the other side closed between frames)."""
    header = bytearray(HEADER.size)
    if not _recv_into(sock, memoryview(header), eof_ok=True):
        return None
    kind, meta_len, payload_len, seq = HEADER.unpack(header)
    return kind, meta_len, payload_len, seq


def recv_bytes(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    _recv_into(sock, memoryview(buffer))
    return bytes(buffer)


def recv_tensors(
    sock: socket.socket,
    layout: Sequence[tuple[str, tuple[int, ...]] | None],
    payload: int,
    *,
    pin_memory: bool = False,
) -> list[torch.Tensor | None]:
    """The payload's tensors, each read straight into a new tensor (pinned memory when
    asked: a GPU worker uploads it from there without another copy)."""
    if payload != payload_bytes(layout):
        raise ChannelClosed(f"payload of {payload} bytes does not match its layout {layout}")
    out: list[torch.Tensor | None] = []
    for entry in layout:
        if entry is None:
            out.append(None)
            continue
        dtype, shape = entry
        tensor = torch.empty(shape, dtype=torch_dtype(dtype), pin_memory=pin_memory)
        if tensor.numel():
            _recv_into(sock, memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        out.append(tensor)
    return out


def skip(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (a payload the reader cannot use)."""
    chunk = memoryview(bytearray(min(n, 1 << 20) or 1))
    while n > 0:
        step = min(n, chunk.nbytes)
        _recv_into(sock, chunk[:step])
        n -= step


def _recv_into(sock: socket.socket, view: memoryview, *, eof_ok: bool = False) -> bool:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            if eof_ok and got == 0:
                return False
            raise ChannelClosed(f"the channel closed mid-frame ({got} of {view.nbytes} bytes)")
        got += n
    return True


@functools.cache
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in a frame; anything else is a broken frame."""
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ChannelClosed(f"no dtype {name!r}")
    return dtype
