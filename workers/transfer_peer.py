"""Block transfers between workers of one host by one copy over the peer's mapped pool.

At ``transfer_join`` every member publishes a handle to its GPU-tier pool on the group's
store and maps the pools of the members on its own host: CUDA IPC between GPUs (a worker
actor sees only its own GPU, and CUDA maps a peer's memory all the same, reached over
NVLink), shared memory between CPU workers. A transfer between two mapped workers then
needs no staging buffer, no chunks and no NCCL message of the data: one side runs a single
copy kernel between its own pool and the peer's, whole blocks as words. ``"push"``: the
sender writes into the receiver's pool; ``"pull"``: the receiver reads the sender's.

The two sides still meet through the process group, with two small messages that order
the copy against each side's own work: the side that does not copy sends "ready" once its
earlier work on the blocks is done (its stream reached the message), the copying side
copies after receiving it and then sends "done", and the other side returns only after
"done" arrived, so no later call of either side sees a half-copied block.

Invariants:
- Only GPU-tier blocks of both sides go this way (the coordinator sends a transfer
  naming any CPU-tier block over the chunked path), and only between two workers that
  mapped each other (``transfer_info()["peers"]``, agreed on by the coordinator).
- A worker maps a peer only when both report the same host identity; a peer that cannot
  be mapped is left out and its transfers take the chunked path.
- CPU pools are moved into shared memory when mapped (in place: every view follows), so
  peer copy between CPU workers is chosen explicitly, never by default.
"""

from __future__ import annotations

import logging
import pickle
import socket
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing
from kvservice.kernels import RowCopy
from kvservice.workers.transfer_chunks import HostTimes, pair_rows

from kvservice.core.errors import FailedPrecondition, InvalidArgument
from kvservice.core.ids import Tier

log = logging.getLogger(__name__)

PEER_COPY_MODES = ("off", "push", "pull")


def host_identity() -> str:
    """This host and boot: two processes with the same identity share memory."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def export_pool(pool: torch.Tensor) -> bytes:
    """A handle another process of this host can map ``pool`` with (``open_pool``)."""
    if pool.device.type == "cpu":
        # By file name: the default strategy passes file descriptors, which only reach a
        # child process. The pool moves into shared memory in place.
        torch.multiprocessing.set_sharing_strategy("file_system")
    return bytes(ForkingPickler.dumps(pool))


def open_pool(handle: bytes) -> torch.Tensor:
    """The peer's pool of ``export_pool``, mapped into this process (CUDA IPC on GPUs)."""
    pool = pickle.loads(handle)  # noqa: S301 - a handle from a member of our own group
    if not isinstance(pool, torch.Tensor):
        raise InvalidArgument(f"a pool handle must give a tensor, got {type(pool).__name__}")
    return pool


def map_peers(
    store: Any,
    rank: int,
    world_size: int,
    pool: torch.Tensor,
    opener: Callable[[bytes], torch.Tensor] = open_pool,
) -> dict[int, torch.Tensor]:
    """Publish this member's pool on ``store`` and map every other member's on this host;
    returns rank -> mapped pool. A peer that cannot be mapped is left out (logged)."""
    me = host_identity()
    try:
        exported: bytes | None = export_pool(pool)
    except Exception:  # noqa: BLE001 - e.g. an allocator whose memory cannot be shared
        log.warning("this worker's pool cannot be shared: peers copy by chunks", exc_info=True)
        exported = None
    # Every member publishes (None when it cannot share): the others wait for the key.
    store.set(f"peer-pool/{rank}", pickle.dumps((me, exported)))
    peers: dict[int, torch.Tensor] = {}
    for other in range(world_size):
        if other == rank:
            continue
        host, handle = pickle.loads(store.get(f"peer-pool/{other}"))  # noqa: S301 - our group
        if host != me or handle is None or exported is None:
            continue  # another host, or one side cannot share: that pair copies by chunks
        try:
            mapped = opener(handle)
        except Exception:  # noqa: BLE001 - that pair takes the chunked path instead
            log.warning("could not map the pool of transfer rank %d", other, exc_info=True)
            continue
        if mapped.shape[1:] != pool.shape[1:] or mapped.dtype != pool.dtype:
            log.warning("transfer rank %d has another block shape: not mapped", other)
            continue
        if mapped.device != pool.device:
            # Mapped in the context of another device of this process: not for our kernels.
            log.warning("transfer rank %d's pool maps to %s: not mapped", other, mapped.device)
            continue
        peers[other] = mapped
    return peers


class PeerCopy:
    """One worker's side of peer-copy transfers: the mapped pools and their copies."""

    def __init__(
        self,
        mode: str,
        pool: torch.Tensor,
        peers: dict[int, torch.Tensor],
        flag_device: torch.device,
    ) -> None:
        if mode not in PEER_COPY_MODES:
            raise InvalidArgument(f"peer_copy must be one of {PEER_COPY_MODES}, got {mode!r}")
        self.mode = mode
        self.pool = pool
        self.peers = peers
        self._copies: dict[int, RowCopy] = {}
        self._pinned: torch.Tensor | None = None
        self._pinned_view: np.ndarray | None = None
        self._device_pairs: torch.Tensor | None = None
        self._uploaded: Any = None
        # The "ready" and "done" messages' buffer (contents unused): 256 bytes, NCCL's
        # alignment. NCCL orders messages on the stream; gloo's (a host buffer) are sent
        # from the host, so a GPU pool's stream is waited for first.
        self._flag = torch.zeros(256, dtype=torch.uint8, device=flag_device)
        self._host_flags = pool.device.type == "cuda" and flag_device.type != "cuda"

    def copies(self, sending: bool) -> bool:
        """Whether this side runs the copy (the sender when pushing)."""
        return (self.mode == "push") == sending

    def run(
        self, peer: int, own: np.ndarray, theirs: np.ndarray, sending: bool, host: HostTimes
    ) -> None:
        """This side of a transfer whose blocks are ``own`` here and ``theirs`` at ``peer``
        (checked [n, 2] (tier, block id) rows), on the current stream; host time noted in
        ``host`` (the pairs' table as index time)."""
        if not self.copies(sending):
            self._flags_wait()
            host.wait(host.post(dist.isend, self._flag, peer))  # ready: earlier work done
            host.wait(host.post(dist.irecv, self._flag, peer))  # done
            return
        start = time.perf_counter()
        pairs = self._pairs(own, theirs, sending)
        host.index_s += time.perf_counter() - start
        host.wait(host.post(dist.irecv, self._flag, peer))  # ready
        host.copy(self._copy(peer, sending), pairs)
        self._flags_wait()
        host.wait(host.post(dist.isend, self._flag, peer))  # done

    def _flags_wait(self) -> None:
        if self._host_flags:
            torch.cuda.current_stream(self.pool.device).synchronize()

    def check(self, peer: int, own: np.ndarray, theirs: Any, sending: bool) -> np.ndarray:
        """``theirs`` as checked rows matching ``own``: the peer mapped, GPU tier on both
        sides, its block ids in range and no destination twice. Both sides check alike,
        so a refused transfer is refused by both before any message."""
        if self.mode == "off" or peer not in self.peers:
            raise FailedPrecondition(f"transfer rank {peer} is not mapped for peer copy")
        table = pair_rows(theirs, "peer blocks")
        if table.shape != own.shape:
            raise InvalidArgument(f"peer blocks must be {len(own)} pairs, got {len(table)}")
        if not len(table):
            return table
        # Whole-array reductions only: this is on the transfer's critical path, and a
        # masked or sorting check of hundreds of blocks costs as much as the copy's launch.
        if (table[:, 0] != Tier.GPU).any() or (own[:, 0] != Tier.GPU).any():
            raise InvalidArgument("peer copy moves GPU-tier blocks only")
        ids = table[:, 1]
        limit = self.peers[peer].shape[0]
        if ids.min() < 0 or ids.max() >= limit:
            raise InvalidArgument(f"peer block ids must be in [0, {limit})")
        # Both sides know both tables and check the same: neither is left waiting.
        dst = own[:, 1] if not sending else ids
        if np.bincount(dst).max() > 1:
            raise InvalidArgument("a destination block appears twice in the transfer")
        return table

    def _pairs(self, own: np.ndarray, theirs: np.ndarray, sending: bool) -> torch.Tensor:
        """The copy's (source, destination) rows on the pool's device. On CUDA through a
        kept pinned buffer and a kept device buffer: allocating pinned memory per transfer
        cost ~0.1 ms of its critical path."""
        src, dst = (own[:, 1], theirs[:, 1]) if sending else (theirs[:, 1], own[:, 1])
        if self.pool.device.type != "cuda":
            return torch.from_numpy(np.stack([src, dst], axis=1))
        n = len(src)
        if self._pinned is None or self._pinned.shape[0] < n:
            size = max(n, 1024)
            self._pinned = torch.empty((size, 2), dtype=torch.int64, pin_memory=True)
            self._pinned_view = self._pinned.numpy()
            self._device_pairs = torch.empty((size, 2), dtype=torch.int64, device=self.pool.device)
            self._uploaded = torch.cuda.Event()
        assert self._pinned_view is not None and self._device_pairs is not None
        self._uploaded.synchronize()  # the last upload has left the pinned buffer (it has:
        # a transfer returns once its stream is done; this covers one that failed midway)
        self._pinned_view[:n, 0] = src
        self._pinned_view[:n, 1] = dst
        out = self._device_pairs[:n]
        out.copy_(self._pinned[:n], non_blocking=True)
        self._uploaded.record()
        return out

    def _copy(self, peer: int, sending: bool) -> RowCopy:
        # One direction per peer: pushing writes the peer's pool, pulling reads it.
        copy = self._copies.get(peer)
        if copy is None:
            mapped = self.peers[peer]
            src, dst = (self.pool, mapped) if sending else (mapped, self.pool)
            copy = self._copies[peer] = RowCopy(src, dst)
        return copy
