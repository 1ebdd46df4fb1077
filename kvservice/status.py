"""The one table between kvservice errors and gRPC status codes, used in both directions.

The server turns a raised ``KVServiceError`` into its status code (``status_of``); the
client turns the code back into the same class (``error_from_status``), so callers catch
``NotFound`` or ``ResourceExhausted`` whatever the transport. ``DataLoss`` carries the
lost sequence ids in trailing metadata (``LOST_SEQ_IDS_KEY``, comma separated) because a
status has only a code and a message. A subclass maps through its nearest listed base.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from kvservice.core import errors

STATUS_TABLE: tuple[tuple[type[errors.KVServiceError], grpc.StatusCode], ...] = (
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)
_CODE_OF: dict[type[errors.KVServiceError], grpc.StatusCode] = dict(STATUS_TABLE)
_ERROR_OF: dict[grpc.StatusCode, type[errors.KVServiceError]] = {
    code: cls for cls, code in STATUS_TABLE
}

LOST_SEQ_IDS_KEY = "kvservice-lost-seq-ids"

Metadata = tuple[tuple[str, str], ...]


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The code for ``exc``: its class's (or nearest listed base's) entry, else INTERNAL."""
    for cls in type(exc).__mro__:
        code = _CODE_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_of(exc: errors.KVServiceError) -> tuple[grpc.StatusCode, str, Metadata]:
    """(code, details, trailing metadata) that report ``exc`` to a gRPC client."""
    metadata: Metadata = ()
    if isinstance(exc, errors.DataLoss):
        metadata = ((LOST_SEQ_IDS_KEY, ",".join(str(s) for s in exc.seq_ids)),)
    return status_code(exc), str(exc), metadata


def error_from_status(
    code: grpc.StatusCode, details: str, trailing_metadata: Iterable[tuple[str, str | bytes]] = ()
) -> errors.KVServiceError | None:
    """The kvservice error a status stands for, or None for codes outside the table."""
    cls = _ERROR_OF.get(code)
    if cls is None:
        return None
    if cls is errors.DataLoss:
        return errors.DataLoss(details, _lost_seq_ids(trailing_metadata))
    return cls(details)


def _lost_seq_ids(metadata: Iterable[tuple[str, str | bytes]]) -> list[int]:
    for key, value in metadata or ():
        if key == LOST_SEQ_IDS_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            return [int(part) for part in text.split(",") if part]
    return []
