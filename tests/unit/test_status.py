"""The error <-> status table round-trips every kvservice error class."""

from __future__ import annotations

import grpc
import pytest

from kvservice.core import errors
from kvservice.status import (
    LOST_SEQ_IDS_KEY,
    STATUS_TABLE,
    error_from_status,
    status_code,
    status_of,
)

EXPECTED = {
    errors.NotFound: "NOT_FOUND",
    errors.InvalidArgument: "INVALID_ARGUMENT",
    errors.FailedPrecondition: "FAILED_PRECONDITION",
    errors.ResourceExhausted: "RESOURCE_EXHAUSTED",
    errors.DataLoss: "DATA_LOSS",
    errors.Unavailable: "UNAVAILABLE",
    errors.Unauthenticated: "UNAUTHENTICATED",
    errors.PermissionDenied: "PERMISSION_DENIED",
}


def test_every_error_class_has_its_code() -> None:
    assert {cls: code.name for cls, code in STATUS_TABLE} == EXPECTED


@pytest.mark.parametrize("cls", sorted(EXPECTED, key=lambda c: c.__name__))
def test_round_trip(cls: type[errors.KVServiceError]) -> None:
    code, details, metadata = status_of(cls("sequence 7 is gone"))
    assert code.name == EXPECTED[cls] and details == "sequence 7 is gone"
    back = error_from_status(code, details, metadata)
    assert type(back) is cls and str(back) == "sequence 7 is gone"


def test_data_loss_names_the_lost_sequences() -> None:
    code, details, metadata = status_of(errors.DataLoss("worker 1 lost", [3, 11]))
    assert code == grpc.StatusCode.DATA_LOSS and metadata == ((LOST_SEQ_IDS_KEY, "3,11"),)
    back = error_from_status(code, details, metadata)
    assert isinstance(back, errors.DataLoss) and back.seq_ids == [3, 11]
    empty = error_from_status(code, details, ())
    assert isinstance(empty, errors.DataLoss) and empty.seq_ids == []


def test_subclasses_map_through_their_base_and_unknown_errors_are_internal() -> None:
    class QuotaExceeded(errors.ResourceExhausted):
        pass

    assert status_code(QuotaExceeded("over quota")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(errors.KVServiceError("?")) == grpc.StatusCode.INTERNAL
    assert status_code(ValueError("?")) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.OK]
)
def test_codes_outside_the_table_are_not_kvservice_errors(code: grpc.StatusCode) -> None:
    assert error_from_status(code, "x") is None
