"""Tensor <-> message: bit-exact round trips, and every malformed message refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvservice.core.errors import InvalidArgument
from kvservice.v1 import kvservice_pb2 as pb
from kvservice.wire import (
    DTYPES,
    append_tokens_from_proto,
    append_tokens_to_proto,
    decode_optional_tensor,
    decode_tensor,
    encode_tensor,
    serialize_with_tensors,
)


def _through_the_wire(tensor: torch.Tensor) -> torch.Tensor:
    data = encode_tensor(tensor).SerializeToString()
    return decode_tensor(pb.Tensor.FromString(data))


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_round_trip_is_bit_exact(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        tensor = torch.randn(3, 5, 7, generator=gen).to(dtype)
        tensor[0, 0, 0] = float("inf")
        tensor[0, 0, 1] = float("nan")
    else:
        tensor = torch.randint(-(2**31), 2**31 - 1, (3, 5, 7), generator=gen).to(dtype)
    back = _through_the_wire(tensor)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_bfloat16_travels_as_its_raw_two_byte_patterns() -> None:
    tensor = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    msg = encode_tensor(tensor)
    assert msg.dtype == "bfloat16" and list(msg.shape) == [2]
    assert msg.data == tensor.view(torch.int16).numpy().tobytes() == b"\x80\x3f\x00\xc0"


def test_non_contiguous_tensors_travel_in_logical_order() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    view = base.transpose(0, 2)[:, 1:]
    assert not view.is_contiguous()
    assert torch.equal(_through_the_wire(view), view)


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 2)])
def test_scalar_and_empty_shapes(shape: tuple[int, ...]) -> None:
    tensor = torch.full(shape, 3.5)
    back = _through_the_wire(tensor)
    assert back.shape == tensor.shape and torch.equal(back, tensor)


def test_decoded_tensor_is_writable_and_independent_of_the_message() -> None:
    msg = encode_tensor(torch.zeros(4))
    back = decode_tensor(msg)
    back += 1
    assert torch.equal(decode_tensor(msg), torch.zeros(4))


def _msg(dtype: str = "float32", shape: tuple[int, ...] = (2, 3), nbytes: int = 24) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(nbytes))


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_msg(dtype="complex64"), "q: unknown dtype 'complex64'"),
        (_msg(dtype=""), "q: unknown dtype ''"),
        (_msg(nbytes=23), "q: 23 bytes of data, but float32 \\[2, 3\\] needs 24"),
        (_msg(nbytes=25), "q: 25 bytes"),
        (_msg(shape=(2, -3)), "q: bad shape \\[2, -3\\]"),
        (_msg(shape=(1,) * 9, nbytes=4), "q: bad shape"),
        (_msg(shape=(2**62, 2**62), nbytes=24), "needs 85070591730234615865843651857942052864"),
        (_msg(dtype="bfloat16", shape=(3,), nbytes=3), "bfloat16 \\[3\\] needs 6"),
    ],
)
def test_malformed_messages_are_invalid_argument(msg: pb.Tensor, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        decode_tensor(msg, "q")


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(InvalidArgument, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


def test_optional_tensor_field() -> None:
    request = pb.AttendRequest(q=encode_tensor(torch.ones(2, 1, 4)))
    assert decode_optional_tensor(request, "k_new") is None
    q = decode_optional_tensor(request, "q")
    assert q is not None and torch.equal(q, torch.ones(2, 1, 4))


@pytest.mark.parametrize(
    "tokens", [[], [[5]], [[1], [2], [3]], [[1, 2], [], [3]], [[], [7, 8, 9]], [[0], [1, 2]]]
)
def test_append_tokens_round_trip_in_both_forms(tokens: list[list[int]]) -> None:
    seq_ids = list(range(1, len(tokens) + 1))
    flat = pb.AppendTokensRequest.FromString(append_tokens_to_proto(seq_ids, tokens).SerializeToString())
    assert not flat.tokens and list(flat.token_counts) == [len(t) for t in tokens]
    assert append_tokens_from_proto(flat) == tokens
    nested = pb.AppendTokensRequest(seq_ids=seq_ids, tokens=[{"tokens": t} for t in tokens])
    assert append_tokens_from_proto(nested) == tokens


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"tokens": [{"tokens": [1]}], "flat_tokens": [1], "token_counts": [1]}, "not both"),
        ({"tokens": [{"tokens": [1]}], "token_counts": [0]}, "not both"),
        ({"flat_tokens": [1, 2], "token_counts": [1]}, "add up to 1"),
        ({"flat_tokens": [1]}, "add up to 0"),
        ({"flat_tokens": [1, 2], "token_counts": [3, -1]}, ">= 0"),
    ],
)
def test_append_tokens_refuses_a_malformed_request(request_fields: dict, message: str) -> None:
    request = pb.AppendTokensRequest(seq_ids=[1], **request_fields)
    with pytest.raises(InvalidArgument, match=message):
        append_tokens_from_proto(request)


def _attend_header() -> pb.AttendRequest:
    return pb.AttendRequest(layer=3, seq_ids=[7, 8], q_lens=[1, 1], scale=0.125, return_lse=True)


@pytest.mark.parametrize("with_kv", [True, False])
def test_serialize_with_tensors_parses_to_the_message_encode_tensor_builds(with_kv: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 64, generator=gen)  # big enough to be adopted, not copied, on decode
    k = torch.randn(4, 2, 16, generator=gen).to(torch.bfloat16).transpose(0, 1)  # non-contiguous
    v = torch.zeros(0, 2, 16)  # empty
    fields = {
        pb.AttendRequest.Q_FIELD_NUMBER: q,
        pb.AttendRequest.K_NEW_FIELD_NUMBER: k if with_kv else None,
        pb.AttendRequest.V_NEW_FIELD_NUMBER: v if with_kv else None,
    }
    wire = pb.AttendRequest.FromString(serialize_with_tensors(_attend_header(), fields))
    expected = _attend_header()
    encode_tensor(q, expected.q)
    if with_kv:
        encode_tensor(k, expected.k_new)
        encode_tensor(v, expected.v_new)
    assert wire == expected
    assert wire.HasField("k_new") is with_kv and wire.HasField("v_new") is with_kv
    assert torch.equal(decode_tensor(wire.q), q)


def test_serialize_with_tensors_refuses_a_dtype_that_cannot_travel() -> None:
    with pytest.raises(InvalidArgument, match="complex64"):
        serialize_with_tensors(pb.AttendRequest(), {4: torch.zeros(2, dtype=torch.complex64)})


def test_a_large_decoded_tensor_is_writable_independent_and_silent() -> None:
    msg = encode_tensor(torch.zeros(64, 16, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "buffer is not writable" warning must not show
        back = decode_tensor(msg)
        back += 1
        again = decode_tensor(msg)
    assert torch.equal(again, torch.zeros(64, 16, 64)) and torch.equal(back, torch.ones(64, 16, 64))
