"""Argument checks shared by the service's entry points: every bad value becomes
INVALID_ARGUMENT with a message that names it, before anything changes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvservice.core import errors
from kvservice.core.ids import DEFAULT_TENANT
from kvservice.step_plan import exact_ints

MAX_TENANT_LEN = 256
INT64_MAX = 2**63 - 1


def as_int(value: object) -> object:
    """Numpy and 0-d torch integers as Python ints; anything else unchanged (checked later)."""
    if isinstance(value, int) or isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point:
        return int(value)
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu":
        return int(value)  # type: ignore[call-overload]
    return value


def check_int(name: str, value: object, *, low: int, high: int = INT64_MAX) -> int:
    value = as_int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidArgument(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise errors.InvalidArgument(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_id(seq_id: object) -> int:
    return check_int("seq_id", seq_id, low=0)


def check_ids(seq_ids: object, *, unique: bool) -> list[int]:
    if isinstance(seq_ids, str | bytes) or not isinstance(seq_ids, Sequence | torch.Tensor):
        raise errors.InvalidArgument("seq_ids must be a list of ints")
    ids = exact_ints(seq_ids, 0)
    if ids is None:
        ids = [check_id(s) for s in seq_ids]
    if unique and len(set(ids)) != len(ids):
        raise errors.InvalidArgument(f"seq_ids has duplicates: {ids}")
    return ids


def check_tenant(tenant: object) -> str:
    if tenant is None:
        return DEFAULT_TENANT
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_TENANT_LEN:
        raise errors.InvalidArgument(f"tenant must be a non-empty string, got {tenant!r}")
    return tenant
