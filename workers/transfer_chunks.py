"""How a block transfer is cut into chunks, and the chunk loop's bookkeeping
(``kvservice.workers.transfer``): the chunk lengths both sides compute alike, the chunks'
index tables made when first needed, and the loop's host time by kind of work."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import Tier

# One chunk's blocks: [n, 2] rows (tier, block id) of the checked block table (a numpy view:
# no Python object per block, whose allocation would also wake the garbage collector).
Run = np.ndarray
# A chunk's index tables: per tier, (tier, positions in the chunk, [n, 3] rows on the pool's
# device), ``TransferMixin._chunk_indexes``.
Parts = list[tuple[Tier, list[int], torch.Tensor]]


def pair_rows(blocks: Any, what: str = "blocks") -> np.ndarray:
    """(tier, block id) pairs as an [n, 2] int64 array (not yet range-checked). ``blocks``
    is pairs, an [n, 2] integer array, or such an int64 array's bytes (row-major): the
    coordinator sends bytes, which Ray passes several times faster than an array."""
    try:
        if isinstance(blocks, bytes | bytearray | memoryview):
            if len(blocks) % 16:
                raise ValueError(f"{len(blocks)} bytes are not whole int64 pairs")
            return np.frombuffer(blocks, dtype=np.int64).reshape(-1, 2)
        table = np.asarray(blocks if len(blocks) else np.empty((0, 2), np.int64))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} must be (tier, block id) pairs: {exc}") from None
    if table.ndim != 2 or table.shape[1] != 2 or table.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be (tier, block id) pairs of ints")
    return table.astype(np.int64, copy=False)


class HostTimes:
    """Host seconds a transfer's chunk loop spends making chunks' index tables, posting
    messages, waiting on them and launching copies: which of them paces the loop."""

    __slots__ = ("post_s", "wait_s", "copy_s", "index_s")

    def __init__(self) -> None:
        self.post_s = self.wait_s = self.copy_s = self.index_s = 0.0

    def post(self, op: Any, tensor: torch.Tensor, peer: int) -> Any:
        t = time.perf_counter()
        work = op(tensor, peer)
        self.post_s += time.perf_counter() - t
        return work

    def copy(self, launch: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``launch(*args, **kwargs)``, a gather or scatter, counted as copy time."""
        t = time.perf_counter()
        result = launch(*args, **kwargs)
        self.copy_s += time.perf_counter() - t
        return result

    def wait(self, work: Any) -> None:
        t = time.perf_counter()
        work.wait()  # on CUDA: the current (transfer) stream waits for it, not the host
        self.wait_s += time.perf_counter() - t

    def spent(self) -> dict[str, float]:
        return {
            "index": self.index_s,
            "post": self.post_s,
            "wait": self.wait_s,
            "copy": self.copy_s,
        }


class ChunkIndexes:
    """The index tables of a transfer's chunks (``TransferMixin._chunk_indexes``), made when first asked
    for: the first chunk's alone, so that it starts without waiting for the others', and
    every other chunk's together when the next is asked for (one upload, not one per
    chunk)."""

    __slots__ = ("_make", "_runs", "_tables", "_host")

    def __init__(
        self, make: Callable[[list[Run]], list[Parts]], runs: list[Run], host: HostTimes
    ) -> None:
        self._make, self._runs, self._host = make, runs, host
        self._tables: list[Parts | None] = [None] * len(runs)

    def __getitem__(self, i: int) -> Parts:
        table = self._tables[i]
        if table is None:
            t = time.perf_counter()
            todo = [0] if i == 0 else [k for k, v in enumerate(self._tables) if k and v is None]
            for k, made in zip(todo, self._make([self._runs[k] for k in todo]), strict=True):
                self._tables[k] = made
            self._host.index_s += time.perf_counter() - t
            table = self._tables[i]
            assert table is not None
        return table


def chunk_lengths(num_blocks: int, per_chunk: int, first: int | None = None) -> list[int]:
    """How a transfer of ``num_blocks`` is cut into chunks (blocks per chunk, in order;
    both sides cut alike from these numbers alone). Even chunks of ``per_chunk`` blocks;
    with ``first``, a ramp: chunks of ``first``, 2 x ``first``, ... from both ends toward
    the middle, which goes in chunks of ``per_chunk``."""
    if num_blocks <= 0:
        return []
    per_chunk = max(1, per_chunk)
    if first is None or first >= per_chunk:
        whole, rest = divmod(num_blocks, per_chunk)
        return [per_chunk] * whole + ([rest] if rest else [])
    head: list[int] = []
    tail: list[int] = []
    left, size = num_blocks, max(1, first)
    while left and size < per_chunk:
        for side in (head, tail):
            take = min(size, left)
            if take:
                side.append(take)
                left -= take
        size *= 2
    return head + chunk_lengths(left, per_chunk) + tail[::-1]
