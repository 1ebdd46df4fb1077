"""Block transfers between workers over torch.distributed: NCCL between GPUs, gloo on CPUs.

The coordinator forms one process group over its worker actors (``kvservice.transfers``
hosts the TCP store and gives each worker its rank); ``transfer_join`` makes this
process a member. A transfer is a ``send_blocks`` on the source worker and the matching
``recv_blocks`` on the destination, naming the same number of blocks: the sender gathers
the blocks into contiguous chunks on the transfer device and sends each; the receiver
receives each chunk and scatters it into its own blocks. Chunks are pipelined (the next
chunk is gathered, and the last one scattered, while one is on the wire), with at most
``CHUNKS_IN_FLIGHT`` staging buffers per side. With ``first_chunk_bytes`` the chunks ramp:
the first and last are that small and each next one doubles up to ``chunk_bytes``
(``chunk_lengths``), so the wire starts after a shorter gather and ends after a shorter
scatter; by default they do not, as the first gather and the last scatter take a full
grid instead (``FULL_GRID_ALONE``), and small chunks cost host time per chunk. A run of
consecutive blocks of one pool on the transfer device goes straight from and into the
pool, with no staging copy.

With ``peer_copy`` (a group-wide choice) members of one host map each other's GPU-tier
pools at join, and a transfer the coordinator marks for it (GPU-tier blocks on both sides,
``peer_blocks`` given to both calls) is one copy kernel between the two pools, ordered by
two small messages (``kvservice.workers.transfer_peer``); no chunk, no staging.

With ``block_messages`` (a group-wide choice, so both sides cut the same messages) every
block goes as a message of its own, grouped per chunk (``batch_isend_irecv``), sent from
and received into its place in the pool: no staging copy, but on an H200 pair 2 MiB
messages reached 59 GB/s against 110 GB/s for gathered 64 MiB chunks, so chunks are the
default. Only blocks of a pool that is not on the transfer device are staged then.

Gathers and scatters on a GPU are a copy kernel (``copier="triton"``, ``RowCopy``: whole
blocks as 8-byte words) by default. ``copy_programs`` bounds its grid so that NCCL's
kernels, which move the previous chunk meanwhile, keep SMs of their own; ``"torch"``
(``index_select`` / ``index_copy_`` over 2-byte elements) and ``"engine"`` (one
device-to-device memcpy per block, on the copy engines) are there to measure against.

Invariants:
- Both sides cut the same chunks from the block count alone, and the coordinator submits
  the two halves of every transfer in one global order on all workers, so sends and
  receives pair up with no handshake, and transfers cannot deadlock.
- Blocks are read or written only after the swaps touching them are done (the rule of
  every entry point), and a call returns once its data has left or landed.
- ``TRANSFER_ENV`` (NVLS and multicast off) is in ``os.environ`` before any process
  group is made; worker actors also get it in their runtime_env.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from kvservice.kernels import RowCopy
from kvservice.workers.checks import check_index
from kvservice.workers.transfer_chunks import (
    ChunkIndexes,
    HostTimes,
    Parts,
    Run,
    chunk_lengths,
    pair_rows,
)
from kvservice.workers.transfer_peer import PEER_COPY_MODES, PeerCopy, map_peers

from kvservice.core.errors import FailedPrecondition, InvalidArgument
from kvservice.core.ids import Tier

TRANSFER_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# 1 GiB of scattered 2 MiB blocks between two H200s (benchmarks/transfer_parts.py, one
# run): 64 MiB chunks 4.06 ms; 128 MiB chunks with the first gather and last scatter on a
# full grid (FULL_GRID_ALONE) 3.82 ms; one plain buffer 3.11 ms. A chunk costs the host
# ~150-350 us (its index table, the copy kernel's launch, NCCL's post), about what 64 MiB
# takes on the wire: smaller chunks leave the wire waiting for the host. Up to
# CHUNKS_IN_FLIGHT chunk-sized staging buffers per worker (384 MiB) live outside the pools.
CHUNK_BYTES = 128 << 20
CHUNKS_IN_FLIGHT = 3
COPIERS = ("triton", "torch", "engine")
DEFAULT_COPIER = "triton"
# A copy kernel with a grid over every SM runs its blocks before NCCL's kernel gets an SM,
# so copies and the wire take turns: on an H200 pair (benchmarks/transfer_parts.py) 1 GiB
# of scattered blocks took 6.3 ms with a full grid, 4.2 ms with 64 programs (link: 3.3).
DEFAULT_COPY_PROGRAMS: int | None = 64
# The copies that run with nothing of the transfer on the wire (the sender's first gather,
# the receiver's last scatter) take a full grid instead: NCCL has no SM to lose then, and
# they are the pipeline's fill and drain.
FULL_GRID_ALONE = True
DEFAULT_FIRST_CHUNK_BYTES: int | None = None
DEFAULT_TIMEOUT_S = 120.0

# (tier, block id) per block, in transfer order: pairs, an [n, 2] integer array, or such an
# int64 array's bytes (``transfer_chunks.pair_rows``)
TierBlocks = Sequence[tuple[int, int]] | np.ndarray | bytes


def apply_transfer_env() -> None:
    os.environ.update(TRANSFER_ENV)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


class TransferMixin:
    """The transfer entry points of ``Worker`` (it provides the pools, the pending-copy
    table, ``_entry`` and the counters)."""

    device: torch.device
    gpu_pool: torch.Tensor
    cpu_pool: torch.Tensor
    _pending: Any
    _counters: Any
    _transfer_rank: int | None = None
    _chunk_bytes: int = CHUNK_BYTES
    _first_chunk_bytes: int | None = DEFAULT_FIRST_CHUNK_BYTES
    _transfer_device: torch.device | None = None
    _probe_buffer: torch.Tensor | None = None
    _copy_stream: Any = None
    _staging_buffers: list[torch.Tensor | None] | None = None
    _row_copies: dict[tuple[Tier, int, bool, bool], RowCopy]
    _block_messages: bool = False
    _copier: str = DEFAULT_COPIER
    _copy_programs: int | None = DEFAULT_COPY_PROGRAMS
    _last_phases: dict[str, dict[str, float]]
    _peer: PeerCopy | None = None

    if TYPE_CHECKING:

        def _entry(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    # ----------------------------------------------------------------- membership
    def transfer_join(
        self,
        host: str,
        port: int,
        group_key: str,
        rank: int,
        world_size: int,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        chunk_bytes: int = CHUNK_BYTES,
        block_messages: bool | None = None,
        copier: str = DEFAULT_COPIER,
        copy_programs: int | None = DEFAULT_COPY_PROGRAMS,
        first_chunk_bytes: int | None = DEFAULT_FIRST_CHUNK_BYTES,
        peer_copy: str = "off",
    ) -> dict[str, Any]:
        """Join process group ``group_key`` (rendezvous on the TCP store at host:port) as
        ``rank`` of ``world_size``, leaving any group this process was in. Blocks until
        every rank has joined. Every member must get the same ``chunk_bytes``,
        ``first_chunk_bytes`` (None, or ``chunk_bytes`` or more: every chunk
        ``chunk_bytes``) and ``block_messages`` (one message per block instead of gathered
        chunks); ``copier`` and ``copy_programs`` choose how this worker gathers and
        scatters; with ``peer_copy`` ("push" or "pull", the same on every member) it maps
        the pools of the members on its host (``kvservice.workers.transfer_peer``)."""
        with self._entry("transfer_join"):
            world_size = check_index("world_size", world_size, 1 << 16)
            chunk_bytes = check_index("chunk_bytes", chunk_bytes, 1 << 40)
            if first_chunk_bytes is not None:
                first_chunk_bytes = check_index("first_chunk_bytes", first_chunk_bytes, 1 << 40)
                if first_chunk_bytes < 1:
                    raise InvalidArgument("first_chunk_bytes must be None or >= 1")
            rank = check_index("rank", rank, world_size)
            backend = backend or default_backend(self.device)
            if backend not in ("nccl", "gloo"):
                raise InvalidArgument(f"backend must be nccl or gloo, got {backend!r}")
            if copier not in COPIERS:
                raise InvalidArgument(f"copier must be one of {COPIERS}, got {copier!r}")
            if copy_programs is not None:
                copy_programs = check_index("copy_programs", copy_programs, 1 << 20)
                if copy_programs < 1:
                    raise InvalidArgument("copy_programs must be None or >= 1")
            if peer_copy not in PEER_COPY_MODES:
                raise InvalidArgument(
                    f"peer_copy must be one of {PEER_COPY_MODES}, got {peer_copy!r}"
                )
            apply_transfer_env()
            self._leave_group()
            timeout = timedelta(seconds=timeout_s)
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(group_key, store),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
            self._transfer_rank = rank
            self._transfer_device = self.device if backend == "nccl" else torch.device("cpu")
            peers = {}
            if peer_copy != "off":
                try:
                    prefixed = dist.PrefixStore(group_key, store)
                    peers = map_peers(prefixed, rank, world_size, self.gpu_pool)
                except BaseException:
                    self._leave_group()  # a member that did not publish: no half-joined group
                    raise
            self._peer = PeerCopy(peer_copy, self.gpu_pool, peers, self._transfer_device)
            self._chunk_bytes = chunk_bytes
            self._first_chunk_bytes = first_chunk_bytes
            self._block_messages = bool(block_messages)
            self._copier = copier
            self._copy_programs = copy_programs
            self._last_phases = {}
            return self.transfer_info()

    def transfer_leave(self) -> None:
        with self._entry("transfer_leave"):
            self._leave_group()

    def _leave_group(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self._transfer_rank = None
        self._transfer_device = None
        self._peer = None  # unmaps the peers' pools
        self._probe_buffer = None
        self._reset_staging()

    def _reset_staging(self) -> None:
        """Forget the staging buffers (and the copies made for them): made again on use."""
        self._staging_buffers = None
        self._row_copies = {}

    def transfer_info(self) -> dict[str, Any]:
        """This worker's rank and group, or rank None outside any group."""
        joined = self._transfer_rank is not None
        return {
            "rank": self._transfer_rank,
            "world_size": dist.get_world_size() if joined else 0,
            "backend": dist.get_backend() if joined else None,
            "device": str(self._transfer_device) if joined else None,
            "chunk_bytes": self._chunk_bytes,
            "first_chunk_bytes": self._first_chunk_bytes,
            "block_messages": self._block_messages if joined else None,
            "copier": self._copier if joined else None,
            "copy_programs": self._copy_programs if joined else None,
            "peer_copy": self._peer.mode if self._peer is not None else None,
            "peers": sorted(self._peer.peers) if self._peer is not None else [],
            "last_ms": dict(self._last_phases) if joined else {},
        }

    # ----------------------------------------------------------------- blocks
    def send_blocks(
        self, dst_rank: int, blocks: TierBlocks, peer_blocks: TierBlocks | None = None
    ) -> int:
        """Send the blocks, in order, to the ``recv_blocks`` of rank ``dst_rank``; returns
        the bytes sent. With ``peer_blocks`` (where they land at the peer, given to both
        sides) the blocks go by peer copy."""
        return self._transfer_blocks("send", dst_rank, blocks, peer_blocks)

    def recv_blocks(
        self, src_rank: int, blocks: TierBlocks, peer_blocks: TierBlocks | None = None
    ) -> int:
        """Receive the blocks of the matching ``send_blocks`` of rank ``src_rank`` into
        these blocks, in order; returns the bytes received. With ``peer_blocks`` (where
        they come from at the peer) the blocks come by peer copy."""
        return self._transfer_blocks("recv", src_rank, blocks, peer_blocks)

    def _transfer_blocks(
        self, side: str, peer_rank: int, blocks: TierBlocks, peer_blocks: TierBlocks | None
    ) -> int:
        start = time.monotonic()
        sending = side == "send"
        with self._entry(f"{side}_blocks"):
            peer, table = self._transfer_args(peer_rank, blocks)
            peer_copy, theirs = self._peer, None  # set whenever this worker is joined
            if peer_blocks is not None:
                if peer_copy is None:  # pragma: no cover - _transfer_args checked the group
                    raise FailedPrecondition("this worker is in no transfer group")
                theirs = peer_copy.check(peer, table, peer_blocks, sending)
            stamps, host = [start, time.monotonic()], HostTimes()
            with self._transfer_stream():
                if peer_copy is not None and theirs is not None:
                    peer_copy.run(peer, table, theirs, sending, host)
                elif self._block_messages:  # the loop's parts go untimed
                    (self._send_messages if sending else self._recv_messages)(
                        peer, self._cut(table)
                    )
                else:
                    (self._send_chunks if sending else self._recv_chunks)(
                        peer, self._cut(table), host
                    )
                stamps.append(time.monotonic())
            self._finish()
            self._note_phases(side, stamps, host)
            return self._count("blocks_sent" if sending else "blocks_received", len(table))

    def _send_chunks(self, peer: int, runs: list[Run], host: HostTimes) -> None:
        """Gather each chunk into a staging buffer (or take its pool slice) and send it,
        up to ``CHUNKS_IN_FLIGHT`` at once; the first gather takes a full grid."""
        indexes = ChunkIndexes(self._chunk_indexes, runs, host)
        in_flight: deque[Any] = deque()
        for i, run in enumerate(runs):
            if len(in_flight) >= CHUNKS_IN_FLIGHT:
                # Its buffer is reused next: the gather waits (on the device) for its send.
                host.wait(in_flight.popleft())
            direct = self._direct_view(run)
            parts = [] if direct is not None else indexes[i]
            tensor = host.copy(self._gather, run, parts, i % CHUNKS_IN_FLIGHT, direct, alone=i == 0)
            in_flight.append(host.post(dist.isend, tensor, peer))
        while in_flight:
            host.wait(in_flight.popleft())

    def _recv_chunks(self, peer: int, runs: list[Run], host: HostTimes) -> None:
        """Receive each chunk into a staging buffer (or its pool slice) and scatter it, up
        to ``CHUNKS_IN_FLIGHT`` posted at once; the last scatter takes a full grid.
        Receives are posted before their chunk's index tables are made (when it is
        scattered): the first goes out right after the check."""
        indexes = ChunkIndexes(self._chunk_indexes, runs, host)
        posted: deque[tuple[Any, torch.Tensor, int, int, bool]] = deque()
        for i, run in enumerate(runs):
            slot = i % CHUNKS_IN_FLIGHT
            direct = self._direct_view(run)
            tensor = direct if direct is not None else self._staging(len(run), slot)
            work = host.post(dist.irecv, tensor, peer)
            posted.append((work, tensor, i, slot, direct is not None))
            if len(posted) >= CHUNKS_IN_FLIGHT:
                # Scattered before the next receive into its buffer is posted.
                self._land_chunk(*posted.popleft(), runs, indexes, host)
        while posted:
            self._land_chunk(*posted.popleft(), runs, indexes, host)

    def transfer_probe(
        self, peer_rank: int, num_bytes: int, send: bool, iters: int = 1, pieces: int = 1
    ) -> float:
        """Plain send (or recv) of one contiguous ``num_bytes`` buffer to ``peer_rank``,
        ``iters`` times: the link's baseline (with ``pieces``, the buffer goes as up to
        that many messages of equal, 256-byte aligned size, queued together). Returns the
        seconds the loop took."""
        with self._entry("transfer_probe"):
            peer, _ = self._transfer_args(peer_rank, [])
            num_bytes = check_index("num_bytes", num_bytes, 1 << 40)
            buffer = self._probe_buffer
            if buffer is None or buffer.numel() != num_bytes:
                buffer = torch.randint(
                    0, 255, (num_bytes,), dtype=torch.uint8, device=self._transfer_device
                )
                self._probe_buffer = buffer
            pieces = check_index("pieces", pieces, num_bytes + 1)
            # Pieces on 256-byte boundaries: NCCL is several times slower on a message
            # that starts unaligned (1 GiB in 6 plain chunks: 5.3 ms against 3.1 on H200s).
            piece = -(-num_bytes // max(1, pieces) // 256) * 256 or num_bytes
            parts = buffer.split(max(1, piece))
            start = time.perf_counter()
            for _ in range(iters):
                if len(parts) == 1:
                    (dist.send if send else dist.recv)(buffer, peer)
                else:
                    op = dist.isend if send else dist.irecv
                    _wait_all([op(part, peer) for part in parts])
            self._finish()
            return time.perf_counter() - start

    # ----------------------------------------------------------------- one message a block
    def _send_messages(self, peer: int, runs: list[Run]) -> None:
        in_flight: deque[list[Any]] = deque()
        for i, run in enumerate(runs):
            if len(in_flight) >= CHUNKS_IN_FLIGHT:
                _wait_all(in_flight.popleft())  # its staging slot is reused next
            tensors = self._message_tensors(run, i % CHUNKS_IN_FLIGHT, fill=True)
            in_flight.append(_batch(dist.isend, tensors, peer))
        while in_flight:
            _wait_all(in_flight.popleft())

    def _recv_messages(self, peer: int, runs: list[Run]) -> None:
        posted: deque[tuple[list[Any], Run, list[torch.Tensor]]] = deque()
        for i, run in enumerate(runs):
            if len(posted) >= CHUNKS_IN_FLIGHT:
                self._land(*posted.popleft())
            tensors = self._message_tensors(run, i % CHUNKS_IN_FLIGHT, fill=False)
            posted.append((_batch(dist.irecv, tensors, peer), run, tensors))
        while posted:
            self._land(*posted.popleft())

    def _message_tensors(self, run: Run, slot: int, *, fill: bool) -> list[torch.Tensor]:
        """One tensor per block: the block in its pool when that pool is on the transfer
        device, else a staging row (filled from the block first when sending)."""
        staging: torch.Tensor | None = None
        tensors = []
        for j, (tier, block_id) in enumerate(run.tolist()):
            pool = self.gpu_pool if tier == Tier.GPU else self.cpu_pool
            if pool.device == self._transfer_device:
                tensors.append(pool[block_id])
                continue
            if staging is None:
                staging = self._staging(len(run), slot)
            if fill:
                staging[j].copy_(pool[block_id], non_blocking=True)
            tensors.append(staging[j])
        return tensors

    def _land(self, works: list[Any], run: Run, tensors: list[torch.Tensor]) -> None:
        _wait_all(works)  # on CUDA: the current (transfer) stream waits for the receives
        for (tier, block_id), tensor in zip(run.tolist(), tensors, strict=True):
            pool = self.gpu_pool if tier == Tier.GPU else self.cpu_pool
            if pool.device != tensor.device:
                pool[block_id].copy_(tensor, non_blocking=True)

    # ----------------------------------------------------------------- internals
    def _transfer_args(self, peer_rank: int, blocks: TierBlocks) -> tuple[int, np.ndarray]:
        """The checked peer and the checked blocks (``_check_blocks``), once the swaps
        touching them are done."""
        if self._transfer_rank is None:
            raise FailedPrecondition("this worker is in no transfer group")
        peer = check_index("peer rank", peer_rank, dist.get_world_size())
        if peer == self._transfer_rank:
            raise InvalidArgument("a worker does not transfer to itself")
        table = self._check_blocks(blocks)
        if len(self._pending):  # swaps in flight: wait for those touching these blocks
            for tier in Tier:
                ids = table[table[:, 0] == tier, 1]
                if ids.size:
                    self._pending.wait_on_host(tier, ids.tolist())
        return peer, table

    def _cut(self, table: np.ndarray) -> list[Run]:
        """The checked blocks cut into chunks: both sides cut alike, from the count alone."""
        block_bytes = self._block_bytes()
        first = self._first_chunk_bytes
        lengths = chunk_lengths(
            len(table),
            max(1, self._chunk_bytes // block_bytes),
            None if first is None else max(1, first // block_bytes),
        )
        starts = np.cumsum([0, *lengths]).tolist()
        return [table[a:b] for a, b in zip(starts, starts[1:], strict=False)]

    def _check_blocks(self, blocks: TierBlocks) -> np.ndarray:
        """``blocks`` as a checked [n, 2] int64 array of (tier, block id), checked all at
        once: a transfer names hundreds of blocks, and a Python check per block costs as
        much host time as a chunk on the wire."""
        table = pair_rows(blocks)
        if not len(table):
            return table
        tiers, ids = table[:, 0], table[:, 1]
        if tiers.min() < 0 or tiers.max() >= len(Tier):
            bad = tiers[(tiers < 0) | (tiers >= len(Tier))]
            raise InvalidArgument(f"tier must be in [0, {len(Tier)}), got {int(bad[0])}")
        if not tiers.any() and 0 <= ids.min() and ids.max() < self.gpu_pool.shape[0]:
            return table  # all GPU tier (0), all in range: the usual case, a few reductions
        for tier in Tier:
            pool = self.gpu_pool if tier is Tier.GPU else self.cpu_pool
            ids = table[tiers == tier, 1]
            wrong = (ids < 0) | (ids >= pool.shape[0])
            if wrong.any():
                raise InvalidArgument(
                    f"{tier.name} block id must be in [0, {pool.shape[0]}), got {int(ids[wrong][0])}"
                )
        return table

    def _block_bytes(self) -> int:
        return self.gpu_pool[0].numel() * self.gpu_pool.element_size()

    def _direct_view(self, run: Run) -> torch.Tensor | None:
        """The pool slice itself when the run is consecutive blocks of one pool that lives
        on the transfer device."""
        tier, first = (int(v) for v in run[0])
        if int(run[-1, 1]) - first != len(run) - 1:
            return None  # not consecutive: most runs end here, before any array op
        pool = self.gpu_pool if tier == Tier.GPU else self.cpu_pool
        if pool.device != self._transfer_device:
            return None
        if (run[:, 0] != tier).any() or (run[:, 1] != np.arange(first, first + len(run))).any():
            return None
        return pool[first : first + len(run)]

    @contextlib.contextmanager
    def _transfer_stream(self) -> Iterator[None]:
        """On CUDA, the transfer's own stream as the current one, after the work queued
        before it (earlier writes of these blocks): NCCL orders its sends and receives
        after the current stream, so gathers, scatters and the wire overlap on the device
        while this thread only queues work, and attention kernels never wait behind a
        transfer. The compute stream waits for the transfer's end (``_finish`` also
        waits on the host)."""
        if self.device.type != "cuda":
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        stream = self._copy_stream
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            yield
        compute.wait_stream(stream)

    def _chunk_indexes(self, runs: list[Run]) -> list[Parts]:
        """Per chunk, per tier of its blocks: (tier, positions in the chunk, rows) where
        rows is [n, 3] on the pool's device: (block id, position, block id). Its first
        column is the index of the torch copier; columns 0-1 are the copy kernel's (source,
        destination) pairs for a gather, columns 1-2 for a scatter (views, no copies). Made
        with numpy, and all of it goes to the device in one asynchronous copy from pinned
        memory: a pageable copy would stall the host until the stream reached it."""
        out: list[Parts] = [[] for _ in runs]
        if not runs:
            return out
        table = np.concatenate(runs)
        lengths = np.array([len(run) for run in runs])
        run_of = np.repeat(np.arange(len(runs)), lengths)
        position = np.arange(len(table)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        for tier in Tier:
            mask = table[:, 0] == tier
            if not mask.any():
                continue
            pool = self.gpu_pool if tier is Tier.GPU else self.cpu_pool
            ids, where = table[mask, 1], position[mask]
            host = torch.from_numpy(np.stack([ids, where, ids], axis=1))
            rows = (
                host.pin_memory().to(pool.device, non_blocking=True)
                if pool.device.type == "cuda"
                else host
            )
            counts = np.bincount(run_of[mask], minlength=len(runs)).tolist()
            at = 0
            for k, count in enumerate(counts):
                if count:
                    out[k].append((tier, where[at : at + count].tolist(), rows[at : at + count]))
                    at += count
        return out

    def _gather(
        self,
        run: Run,
        parts: Parts,
        slot: int,
        direct: torch.Tensor | None,
        *,
        alone: bool = False,
    ) -> torch.Tensor:
        """The chunk to send: ``direct`` (the pool slice, ``_direct_view``) or staging
        buffer ``slot`` with the run's blocks gathered into it (``alone``: with nothing
        of the transfer on the wire, ``FULL_GRID_ALONE``)."""
        if direct is not None:
            return direct
        out = self._staging(len(run), slot)
        for tier, positions, rows in parts:
            pool = self.gpu_pool if tier is Tier.GPU else self.cpu_pool
            index = rows[:, 0]
            if len(positions) == len(run) and pool.device == out.device:
                self._copy_whole(tier, slot, out, rows[:, 0:2], run, sending=True, alone=alone)
            elif len(positions) == len(run):
                out.copy_(pool.index_select(0, index), non_blocking=True)
            else:
                where = torch.tensor(positions, device=out.device)
                out[where] = pool.index_select(0, index).to(out.device)
        return out

    def _copy_whole(
        self,
        tier: Tier,
        slot: int,
        staging: torch.Tensor,
        pairs: torch.Tensor,
        run: Run,
        *,
        sending: bool,
        alone: bool = False,
    ) -> None:
        """Gather (``sending``: pool -> staging) or scatter (staging -> pool) whole blocks
        of the ``tier`` pool on staging buffer ``slot``'s device; ``pairs`` are (source,
        destination) rows, ``run`` the same blocks as (tier, block id) for the engine
        copier."""
        pool = self.gpu_pool if tier is Tier.GPU else self.cpu_pool
        if self._copier == "triton":
            self._row_copy(tier, slot, staging, sending, alone)(pairs)
        elif self._copier == "engine":
            for position, block_id in enumerate(run[:, 1].tolist()):
                if sending:
                    staging[position].copy_(pool[block_id], non_blocking=True)
                else:
                    pool[block_id].copy_(staging[position], non_blocking=True)
        elif sending:
            # As [blocks, bytes of a block]: indexing a 6-D pool computes a 6-D offset per
            # element, several times slower than the copy itself on a GPU.
            torch.index_select(_rows2d(pool), 0, pairs[:, 0], out=_rows2d(staging))
        else:
            _rows2d(pool).index_copy_(0, pairs[:, 1], _rows2d(staging))

    def _row_copy(
        self, tier: Tier, slot: int, staging: torch.Tensor, sending: bool, alone: bool
    ) -> RowCopy:
        """The copy kernel between the ``tier`` pool and staging buffer ``slot`` (a full
        grid when ``alone``, see ``FULL_GRID_ALONE``). A kept (CUDA) buffer's copy is
        checked once and kept with it, so per chunk only the launch is left; a CPU chunk's
        fresh buffer gets a copy of its own."""
        pool = self.gpu_pool if tier is Tier.GPU else self.cpu_pool
        full = alone and FULL_GRID_ALONE
        buffers = self._staging_buffers
        kept = buffers[slot] if buffers is not None else None
        key = (tier, slot, sending, full)
        copy = self._row_copies.get(key) if kept is not None else None
        if copy is None:
            buffer = staging if kept is None else kept
            src, dst = (pool, buffer) if sending else (buffer, pool)
            copy = RowCopy(src, dst, programs=None if full else self._copy_programs)
            if kept is not None:
                self._row_copies[key] = copy
        return copy

    def _staging(self, num_blocks: int, slot: int) -> torch.Tensor:
        """Staging buffer ``slot`` (of ``CHUNKS_IN_FLIGHT``), at least ``num_blocks`` long.
        On CUDA the buffers are kept between transfers (no allocation per chunk; their
        reuse is ordered on the transfer stream); on CPU each chunk gets its own."""
        shape = (num_blocks, *self.gpu_pool.shape[1:])
        device = self._transfer_device
        if device is None or device.type != "cuda":
            return torch.empty(shape, dtype=self.gpu_pool.dtype, device=device)
        buffers = self._staging_buffers
        if buffers is None:
            buffers = self._staging_buffers = [None] * CHUNKS_IN_FLIGHT
        buffer = buffers[slot]
        if buffer is None or buffer.shape[0] < num_blocks:
            self._row_copies.clear()  # they copy into the buffers they were made for
            per_chunk = max(1, self._chunk_bytes // self._block_bytes())
            buffer = torch.empty(
                (max(num_blocks, per_chunk), *self.gpu_pool.shape[1:]),
                dtype=self.gpu_pool.dtype,
                device=device,
            )
            buffers[slot] = buffer
        return buffer[:num_blocks]

    def _land_chunk(
        self,
        work: Any,
        tensor: torch.Tensor,
        i: int,
        slot: int,
        in_place: bool,
        runs: list[Run],
        indexes: ChunkIndexes,
        host: HostTimes,
    ) -> None:
        """Chunk ``i``'s receive done (on CUDA: the transfer stream waits for it), its
        blocks scattered from staging buffer ``slot`` unless it landed in place."""
        host.wait(work)
        if not in_place:
            parts = indexes[i]
            host.copy(self._scatter, tensor, runs[i], parts, slot, alone=i == len(runs) - 1)

    def _scatter(
        self,
        tensor: torch.Tensor,
        run: Run,
        parts: Parts,
        slot: int,
        *,
        alone: bool = False,
    ) -> None:
        for tier, positions, rows in parts:
            pool = self.gpu_pool if tier is Tier.GPU else self.cpu_pool
            if len(positions) == len(run) and pool.device == tensor.device:
                self._copy_whole(tier, slot, tensor, rows[:, 1:3], run, sending=False, alone=alone)
                continue
            part = tensor
            if len(positions) != len(run):
                part = tensor[torch.tensor(positions, device=tensor.device)]
            _rows2d(pool).index_copy_(0, rows[:, 0], _rows2d(part.to(pool.device)))

    def _note_phases(self, side: str, stamps: list[float], host: HostTimes) -> None:
        """Host milliseconds of the last transfer's phases, for operators
        (``transfer_info()["last_ms"]``): checking the blocks, queuing every chunk, and
        waiting for the device to finish (and their ``total``); within the queuing, the
        time spent making index tables, posting sends or receives, in their waits and in
        copies; and ``started_s``, when the call began (``time.monotonic``: one clock for
        every process of a host, so the two sides' start times show how far apart they
        began)."""
        stamps.append(time.monotonic())
        names = ("check", "queue", "device_wait")
        spans = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        phases = {n: round(1e3 * t, 3) for n, t in zip(names, spans, strict=True)}
        phases["total"] = round(1e3 * (stamps[-1] - stamps[0]), 3)
        phases |= {f"queue_{k}": round(1e3 * v, 3) for k, v in host.spent().items()}
        self._last_phases[side] = phases | {"started_s": stamps[0]}

    def _finish(self) -> None:
        """Return only once the data has left (sender) or landed (receiver)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _count(self, counter: str, num_blocks: int) -> int:
        self._counters[counter] += num_blocks
        return num_blocks * self._block_bytes()


def _rows2d(blocks: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[n, *block_shape]`` tensor as ``[n, elements per block]``."""
    return blocks.view(blocks.shape[0], -1)


def _batch(op: Any, tensors: list[torch.Tensor], peer: int) -> list[Any]:
    """One group of point-to-point messages (NCCL launches them together)."""
    return dist.batch_isend_irecv([dist.P2POp(op, t, peer) for t in tensors])


def _wait_all(works: list[Any]) -> None:
    for work in works:
        work.wait()
