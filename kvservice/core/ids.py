"""Typed identifiers shared by every layer.

Ids are plain ints at run time; NewType only lets the type checker keep a block id
from being passed where a sequence id is expected.
"""

from __future__ import annotations

import enum
from typing import NewType

SeqId = NewType("SeqId", int)
BlockId = NewType("BlockId", int)
WorkerId = NewType("WorkerId", int)
BlockHash = NewType("BlockHash", int)
TenantId = NewType("TenantId", str)

DEFAULT_TENANT = TenantId("default")


class Tier(enum.IntEnum):
    """Where a block lives on its worker."""

    GPU = 0
    CPU = 1
