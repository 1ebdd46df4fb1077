"""Decode attention on fixed step buffers, for a caller that runs a local worker's kernels.

A CUDA graph replays the kernels it captured with the same arguments: the same tensors,
so the same addresses. ``StepBuffers`` are those tensors for one (batch, table width)
bucket: token ids, positions, block tables, lengths and write slots, refilled before
every step. Rows past the step's batch are padding: they write nothing (slot -1) and
attend one token of block 0 (read, never used). ``DirectDecode`` is the per-layer
attention over them: write the new K/V, then the decode kernel, no checks that would
wait for the device (the coordinator planned the tables; ``fill`` checks them on the
host).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvservice import kernels


@dataclass(frozen=True, slots=True)
class StepBuffers:
    batch: int  # rows, padding included
    width: int  # table entries per row
    block_size: int
    num_blocks: int  # of the device tier the tables index
    meta32: torch.Tensor  # tables [batch * width] then seq_lens [batch], int32
    meta64: torch.Tensor  # token ids, positions, slots: [3, rows64] int64

    @classmethod
    def allocate(
        cls, batch: int, width: int, block_size: int, num_blocks: int, device: torch.device
    ) -> StepBuffers:
        if batch < 1 or width < 1:
            raise ValueError(f"step buffers need batch and width >= 1, got {batch}, {width}")
        meta32 = torch.zeros(batch * width + batch, dtype=torch.int32, device=device)
        meta32[batch * width :] = 1
        rows64 = batch + batch % 2  # keeps each int64 row 16-byte aligned
        meta64 = torch.zeros((3, rows64), dtype=torch.int64, device=device)
        meta64[2] = -1
        return cls(batch, width, block_size, num_blocks, meta32, meta64)

    @property
    def tables(self) -> torch.Tensor:
        return self.meta32[: self.batch * self.width].view(self.batch, self.width)

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.meta32[self.batch * self.width :]

    @property
    def token_ids(self) -> torch.Tensor:
        return self.meta64[0, : self.batch]

    @property
    def positions(self) -> torch.Tensor:
        return self.meta64[1, : self.batch]

    @property
    def slots(self) -> torch.Tensor:
        return self.meta64[2, : self.batch]

    def fill(
        self,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
    ) -> None:
        """Load one decode step: sequence i's new token ``token_ids[i]`` at RoPE position
        ``positions[i]`` goes into the last of its ``seq_lens[i]`` positions. Two
        asynchronous copies from pinned memory; the host never waits for the device."""
        n = len(seq_lens)
        if (
            not 0 < n <= self.batch
            or not len(block_tables) == len(token_ids) == len(positions) == n
        ):
            raise ValueError(f"a step of {n} sequences does not fit buffers of {self.batch} rows")
        batch, width, block_size = self.batch, self.width, self.block_size
        meta32 = np.zeros(batch * width + batch, dtype=np.int32)
        tables = meta32[: batch * width].reshape(batch, width)
        for i, row in enumerate(block_tables):
            if len(row) > width:
                raise ValueError(f"a block table of {len(row)} entries exceeds width {width}")
            tables[i, : len(row)] = row
        lens = np.asarray(seq_lens, dtype=np.int64)
        needed = -(-lens // block_size)
        row_lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=n)
        if lens.min() < 1 or (needed > row_lens).any():
            raise ValueError("every sequence needs a length >= 1 covered by its block table")
        used = tables[:n]
        if used.size and (used.min() < 0 or used.max() >= self.num_blocks):
            raise ValueError(f"block ids must be in [0, {self.num_blocks})")
        meta32[batch * width : batch * width + n] = lens
        meta32[batch * width + n :] = 1
        last = lens - 1
        meta64 = np.zeros(self.meta64.shape, dtype=np.int64)
        meta64[0, :n] = token_ids
        meta64[1, :n] = positions
        meta64[2, :] = -1
        meta64[2, :n] = used[np.arange(n), last // block_size].astype(np.int64) * block_size + (
            last % block_size
        )
        pinned = self.meta32.is_cuda
        for dst, src in ((self.meta32, meta32), (self.meta64, meta64)):
            host = torch.from_numpy(src)
            dst.copy_(host.pin_memory() if pinned else host, non_blocking=pinned)


class DirectDecode:
    """One step's decode attention, layer by layer, on a worker's device-tier pools."""

    def __init__(
        self, caches: Sequence[tuple[torch.Tensor, torch.Tensor]], buffers: StepBuffers
    ) -> None:
        self._caches = list(caches)
        self.buffers = buffers

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """q [batch, Hq, D], k/v [batch, Hkv, D] of the step's new tokens -> out [batch, Hq, D]."""
        if sliding_window is not None:
            raise ValueError("direct decode steps do not support sliding-window attention")
        k_cache, v_cache = self._caches[layer]
        buffers = self.buffers
        kernels.write_kv(k_cache, v_cache, k, v, buffers.slots, check_indices=False)
        out = kernels.paged_decode(
            q, k_cache, v_cache, buffers.tables, buffers.seq_lens,
            scale=scale, check_indices=False,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return out
