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
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing
from kvservice.kernels import RowCopy

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
    store.set(f"peer-pool/{rank}", pickle.dumps((me, export_pool(pool))))
    peers: dict[int, torch.Tensor] = {}
    for other in range(world_size):
        if other == rank:
            continue
        host, handle = pickle.loads(store.get(f"peer-pool/{other}"))  # noqa: S301 - our group
        if host != me:
            continue
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
        # The "ready" and "done" messages' buffer (contents unused): 256 bytes, NCCL's
        # alignment. NCCL orders messages on the stream; gloo's (a host buffer) are sent
        # from the host, so a GPU pool's stream is waited for first.
        self._flag = torch.zeros(256, dtype=torch.uint8, device=flag_device)
        self._host_flags = pool.device.type == "cuda" and flag_device.type != "cuda"

    def copies(self, sending: bool) -> bool:
        """Whether this side runs the copy (the sender when pushing)."""
        return (self.mode == "push") == sending

    def run(self, peer: int, own: np.ndarray, theirs: np.ndarray, sending: bool) -> None:
        """This side of a transfer whose blocks are ``own`` here and ``theirs`` at ``peer``
        ([n, 2] (tier, block id) rows; ``own`` already checked), on the current stream."""
        if not self.copies(sending):
            if self._host_flags:
                torch.cuda.current_stream(self.pool.device).synchronize()
            dist.send(self._flag, peer)  # ready: this side's earlier work is done
            dist.recv(self._flag, peer)  # done
            return
        pairs = self._pairs(own, theirs, sending)
        dist.recv(self._flag, peer)  # ready
        self._copy(peer, sending)(pairs)
        if self._host_flags:
            torch.cuda.current_stream(self.pool.device).synchronize()
        dist.send(self._flag, peer)  # done

    def check(self, peer: int, own: np.ndarray, theirs: Any, sending: bool) -> np.ndarray:
        """``theirs`` as checked rows matching ``own``: GPU tier on both sides, and for the
        copying side the peer mapped and its block ids in range."""
        if self.mode == "off" or peer not in self.peers:
            raise FailedPrecondition(f"transfer rank {peer} is not mapped for peer copy")
        try:
            table = np.asarray(theirs)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"peer blocks must be (tier, block id) pairs: {exc}") from None
        if table.shape != own.shape or table.dtype.kind not in "iu":
            raise InvalidArgument(
                f"peer blocks must be {len(own)} (tier, block id) pairs of ints, "
                f"got shape {table.shape}"
            )
        table = table.astype(np.int64, copy=False)
        if (table[:, 0] != Tier.GPU).any() or (own[:, 0] != Tier.GPU).any():
            raise InvalidArgument("peer copy moves GPU-tier blocks only")
        ids = table[:, 1]
        limit = self.peers[peer].shape[0]
        if ((ids < 0) | (ids >= limit)).any():
            raise InvalidArgument(f"peer block ids must be in [0, {limit})")
        # Both sides know both tables and check the same: neither is left waiting.
        dst = own[:, 1] if not sending else ids
        if np.unique(dst).size != dst.size:
            raise InvalidArgument("a destination block appears twice in the transfer")
        return table

    def _pairs(self, own: np.ndarray, theirs: np.ndarray, sending: bool) -> torch.Tensor:
        src, dst = (own[:, 1], theirs[:, 1]) if sending else (theirs[:, 1], own[:, 1])
        host = torch.from_numpy(np.stack([src, dst], axis=1))
        if self.pool.device.type != "cuda":
            return host
        return host.pin_memory().to(self.pool.device, non_blocking=True)

    def _copy(self, peer: int, sending: bool) -> RowCopy:
        # One direction per peer: pushing writes the peer's pool, pulling reads it.
        copy = self._copies.get(peer)
        if copy is None:
            mapped = self.peers[peer]
            src, dst = (self.pool, mapped) if sending else (mapped, self.pool)
            copy = self._copies[peer] = RowCopy(src, dst)
        return copy
