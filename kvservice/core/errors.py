"""Errors the core raises for misuse; every layer above maps them to one status table.

Running out of memory is not an error here: allocation paths return a result that says
so, and only the API edge turns it into RESOURCE_EXHAUSTED.
"""

from __future__ import annotations


class KVServiceError(Exception):
    """Base of every error kvservice raises on purpose."""


class NotFound(KVServiceError):
    """An id (sequence, worker) that does not exist, or belongs to another tenant."""


class InvalidArgument(KVServiceError):
    """Bad arguments: shapes, dtypes, negative or overflowing numbers, unknown tokens."""


class FailedPrecondition(KVServiceError):
    """The call is well formed but the state forbids it (freed sequence, write past end)."""


class ResourceExhausted(KVServiceError):
    """Out of memory after eviction and swapping, or over a tenant's quota."""


class DataLoss(KVServiceError):
    """A worker was lost; ``seq_ids`` names the sequences whose KV went with it."""

    def __init__(self, message: str, seq_ids: list[int] | None = None) -> None:
        super().__init__(message)
        self.seq_ids = list(seq_ids or [])


class Unavailable(KVServiceError):
    """The service is starting or shutting down."""


class Unauthenticated(KVServiceError):
    """No valid credentials."""


class PermissionDenied(KVServiceError):
    """Valid credentials that do not allow the call."""
