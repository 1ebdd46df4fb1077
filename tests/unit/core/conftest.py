"""Fixtures of the core tests: a small manager and the full state snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from core_helpers import LAYOUT, snapshot

from kvservice.core.commands import PoolSizes
from kvservice.core.manager import KVCacheManager


@pytest.fixture
def make_manager() -> Callable[..., KVCacheManager]:
    def make(gpu: int = 8, cpu: int = 4, num_workers: int = 1, **options: Any) -> KVCacheManager:
        options.setdefault("high_watermark", 1.0)
        options.setdefault("low_watermark", 1.0)
        sizes = {w: PoolSizes(gpu, cpu) for w in range(num_workers)}
        return KVCacheManager(LAYOUT, sizes, **options)

    return make


@pytest.fixture
def snap() -> Callable[[KVCacheManager], Any]:
    return snapshot
