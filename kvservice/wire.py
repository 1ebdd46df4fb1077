"""Python values <-> kvservice.v1 messages; tensors as raw bytes, a dtype name and a shape.

Shared by the servicer and the client transport, so both sides convert the same way.

Tensors are never pickled. A ``kvservice.v1.Tensor`` holds the elements in row-major
order as their native little-endian bytes. bfloat16 has no numpy type, so every tensor
travels through a ``uint8`` view of its storage, which keeps the exact bit patterns.

Encoding for the large calls (``serialize_with_tensors``) writes a message's tensor fields
by hand, so the tensor's bytes are copied once, into the finished message, instead of
three times (to bytes, into the message, out to the wire form); the result parses to the
same message. Decoding reads a field's bytes (which copies them out of the message) and
builds the tensor over that copy, without copying again.

Decoding trusts nothing: the dtype must be a known name, every dimension non-negative and
the byte count exactly ``product(shape) * itemsize``; anything else is InvalidArgument
naming the field, so a malformed message becomes INVALID_ARGUMENT at the edge and never a
crash or a misread tensor further in.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import cast

import torch

from kvservice.api import SequenceInfo
from kvservice.core.errors import InvalidArgument
from kvservice.core.layout import Layout
from kvservice.v1 import kvservice_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# Call metadata naming the tenant a call acts for (see the proto's header comment).
TENANT_KEY = "kvservice-tenant"
# A prefill's queries for a long prompt run to tens of MiB; gRPC's default limit is 4 MiB.
MAX_MESSAGE_BYTES = 1 << 30


def message_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel and server options that let tensor payloads through."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# Dimensions beyond this are refused before any arithmetic on them, so a forged shape
# cannot make the byte-count check itself expensive.
MAX_DIMS = 8


def encode_tensor(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """The message for ``tensor`` (any device, any strides); fills ``out`` when given."""
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise InvalidArgument(f"dtype {tensor.dtype} cannot travel; known: {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    msg = pb.Tensor() if out is None else out
    msg.dtype = name
    msg.shape[:] = tensor.shape
    msg.data = flat.view(torch.uint8).numpy().tobytes()
    return msg


def decode_tensor(msg: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """A new CPU tensor from ``msg``; InvalidArgument (naming ``field``) if malformed."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}: unknown dtype {msg.dtype!r}; known: {sorted(DTYPES)}")
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS or any(size < 0 for size in shape):
        raise InvalidArgument(f"{field}: bad shape {list(shape)}")
    data = msg.data
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}: {len(data)} bytes of data, but {msg.dtype} {list(shape)} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return _bytes_tensor(data).view(dtype).reshape(shape)


# Below this many bytes a copy costs less than it saves (and tiny bytes may be shared).
_ADOPT_MIN_BYTES = 4096
_adopted_once = False
_adopting_first = threading.Lock()  # catch_warnings swaps process-wide state


def _bytes_tensor(data: bytes) -> torch.Tensor:
    """A writable uint8 tensor of ``data``, which must be a fresh copy nobody else holds.

    Reading a bytes field gives a new object each time, so the tensor can use its memory
    as it is: a 256 KiB query is then copied once on the way in, not twice. torch warns,
    once per process, that bytes are not writable; the first adoption silences that
    warning, which is about exactly this case.
    """
    global _adopted_once
    if len(data) < _ADOPT_MIN_BYTES:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if _adopted_once:
        return torch.frombuffer(data, dtype=torch.uint8)
    with _adopting_first, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(data, dtype=torch.uint8)
        _adopted_once = True
    return tensor


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_LEN = 2  # the wire type of bytes, strings and embedded messages
_DATA_KEY = _varint(pb.Tensor.DATA_FIELD_NUMBER << 3 | _LEN)


def tensor_field(number: int, tensor: torch.Tensor) -> list[bytes | memoryview]:
    """Field ``number`` holding ``tensor`` as a ``Tensor`` message, in wire form: pieces to
    join, the last one a view of the tensor's own bytes (nothing copied yet)."""
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise InvalidArgument(f"dtype {tensor.dtype} cannot travel; known: {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().data  # a memoryview of the storage
    head = pb.Tensor(dtype=name, shape=tensor.shape).SerializeToString()
    if len(data):  # as protobuf does, an empty bytes field is left out
        head += _DATA_KEY + _varint(len(data))
    return [_varint(number << 3 | _LEN) + _varint(len(head) + len(data)) + head, data]


def serialize_with_tensors(msg: object, tensors: Mapping[int, torch.Tensor | None]) -> bytes:
    """``msg`` in wire form with each tensor in ``tensors`` (field number -> tensor, None
    for unset) as its field; ``msg`` must leave those fields unset. Parses to the message
    that ``encode_tensor`` into each field would give; each tensor's bytes are copied once.
    """
    pieces: list[bytes | memoryview] = [msg.SerializeToString()]  # type: ignore[attr-defined]
    for number, tensor in tensors.items():
        if tensor is not None:
            pieces += tensor_field(number, tensor)
    return b"".join(pieces)


def decode_optional_tensor(parent: object, field: str) -> torch.Tensor | None:
    """The tensor in message field ``field`` of ``parent``, or None when the field is unset."""
    if not parent.HasField(field):  # type: ignore[attr-defined]
        return None
    return decode_tensor(getattr(parent, field), field)


def append_tokens_to_proto(
    seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]
) -> pb.AppendTokensRequest:
    """An AppendTokens request in the flat form: two flat repeated fields, built in C."""
    return pb.AppendTokensRequest(
        seq_ids=seq_ids,
        flat_tokens=list(chain.from_iterable(tokens)),
        token_counts=[len(t) for t in tokens],
    )


def append_tokens_from_proto(request: pb.AppendTokensRequest) -> list[list[int]]:
    """Each sequence's new tokens from either form of the request (see the proto).

    InvalidArgument when both forms are given, a count is negative, or the counts do not
    add up to the flat tokens. Whether there is one list per sequence is the service's
    check, as for the per-sequence form.
    """
    counts = request.token_counts[:]  # a slice of a repeated field: a list, made fast
    flat = request.flat_tokens[:]
    if request.tokens:
        if counts or flat:
            raise InvalidArgument("give tokens or flat_tokens with token_counts, not both")
        return [t.tokens[:] for t in request.tokens]
    if counts and min(counts) < 0:
        raise InvalidArgument("token_counts must be >= 0")
    if sum(counts) != len(flat):
        raise InvalidArgument(
            f"token_counts add up to {sum(counts)}, but there are {len(flat)} flat_tokens"
        )
    if counts.count(1) == len(counts):  # one token for each sequence: a decode step
        return [[token] for token in flat]
    token_lists: list[list[int]] = []
    start = 0
    for count in counts:
        token_lists.append(flat[start : start + count])
        start += count
    return token_lists


def sequence_info_to_proto(info: SequenceInfo) -> pb.SequenceInfo:
    return pb.SequenceInfo(
        seq_id=info.seq_id,
        length=info.length,
        num_cached_tokens=info.num_cached_tokens,
        worker_id=info.worker_id,
        num_blocks=info.num_blocks,
        # The proto enum's values are the core's Tier ints; only the stub's types differ.
        tiers=cast("list[pb.Tier]", list(info.tiers)),
    )


def sequence_info_from_proto(msg: pb.SequenceInfo) -> SequenceInfo:
    return SequenceInfo(
        seq_id=msg.seq_id,
        length=msg.length,
        num_cached_tokens=msg.num_cached_tokens,
        worker_id=msg.worker_id,
        num_blocks=msg.num_blocks,
        tiers=tuple(msg.tiers),
    )


def layout_to_proto(layout: Layout) -> pb.Layout:
    return pb.Layout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        block_size=layout.block_size,
    )


def layout_from_proto(msg: pb.Layout) -> Layout:
    return Layout(msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.dtype, msg.block_size)
