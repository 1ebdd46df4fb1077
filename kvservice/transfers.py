"""Running the core's ``TransferBlocks`` between workers.

- Between members of the transfer group, a transfer is one ``send_blocks`` on the source
  and one ``recv_blocks`` on the destination (``kvservice.workers.transfer``): GPU to GPU
  over NCCL, or over gloo between CPU workers. Between two members that mapped each
  other's pools (same host, ``peer_copy``) a transfer of GPU-tier blocks is one copy
  kernel between the pools instead (path "peer"): both calls get both sides' blocks.
- Otherwise (a worker outside the group, local workers, no group at all) the blocks go
  through host memory: ``export_blocks`` on the source, ``import_blocks`` on the
  destination, one pair per (source tier, destination tier). Between Ray actors the
  exported tensor goes from actor to actor as an object reference (the coordinator never
  holds it); between local workers it is handed over in this process.

``TransferGroup`` is the coordinator's side of the group: it hosts the TCP store the
workers rendezvous on (this node's address, a free port) and makes every Ray worker join
one torch.distributed group with its rank; ``form`` again after workers join or leave.
Forming waits for every member's calls submitted before it (calls to a worker run in
order), so no transfer of an old group is in flight when the new one starts.

Ordering: both halves of a transfer are submitted together, under the coordinator's
lock, so every worker meets its sends and receives in one global order (no deadlock),
and each side runs its half after the calls planned before it and before those planned
after it (no stale or half-written block is ever read).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping
from datetime import timedelta

import numpy as np

from kvservice.coordinator_workers import PendingCall, RayWorkerHandle, WorkerHandle, resolve_all
from kvservice.core.ids import Tier
from kvservice.core.migration import TransferBlocks
from kvservice.workers.transfer import (
    DEFAULT_COPIER,
    DEFAULT_COPY_PROGRAMS,
    DEFAULT_FIRST_CHUNK_BYTES,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
# Between GPUs of one host (NCCL groups): "pull" (the receiver's kernel reads the sender's
# pool over NVLink) or "push". Pull, because the receiver's call is submitted first: the
# side that copies starts first. Between CPU workers peer copy moves the pools
# into shared memory, so it is only on when asked for.
DEFAULT_GPU_PEER_COPY = "pull"


class TransferGroup:
    """A torch.distributed group over Ray worker actors, rendezvous on a store hosted here."""

    def __init__(
        self,
        host: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        chunk_bytes: int | None = None,
        block_messages: bool = False,
        copier: str = DEFAULT_COPIER,
        copy_programs: int | None = DEFAULT_COPY_PROGRAMS,
        first_chunk_bytes: int | None = DEFAULT_FIRST_CHUNK_BYTES,
        peer_copy: str | None = None,
    ) -> None:
        import torch.distributed as dist

        from kvservice.workers.transfer import CHUNK_BYTES, TRANSFER_ENV

        for key, value in TRANSFER_ENV.items():
            os.environ.setdefault(key, value)
        self.host = host or _node_address()
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES
        # The first and last chunks' size when chunks ramp up to chunk_bytes (None: even).
        self.first_chunk_bytes = first_chunk_bytes
        # One message per block instead of gathered chunks (kvservice.workers.transfer).
        self.block_messages = bool(block_messages)
        # How workers gather and scatter blocks (kvservice.workers.transfer; programs None:
        # a full grid).
        self.copier = copier
        self.copy_programs = copy_programs
        # "push", "pull" or "off"; None: DEFAULT_GPU_PEER_COPY over NCCL, "off" over gloo.
        self.peer_copy = peer_copy
        self._store = dist.TCPStore(
            self.host, 0, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        self.port = int(self._store.port)
        self.generation = 0
        self.ranks: dict[int, int] = {}  # worker id -> rank in the current group
        self.backend: str | None = None
        # Worker-id pairs that mapped each other's pools: their transfers go by peer copy.
        self.peer_pairs: set[frozenset[int]] = set()

    def form(
        self, handles: Mapping[int, WorkerHandle], devices: Mapping[int, str]
    ) -> dict[int, int]:
        """Every Ray worker of ``handles`` joins a new group (ranks in worker-id order);
        with fewer than two there is no group. Returns the ranks."""
        members = sorted(w for w, h in handles.items() if isinstance(h, RayWorkerHandle))
        if len(members) < 2:
            self.leave(handles)
            return {}
        self.generation += 1
        backend = "nccl" if all(devices[w].startswith("cuda") for w in members) else "gloo"
        peer_copy = self.peer_copy or (DEFAULT_GPU_PEER_COPY if backend == "nccl" else "off")
        key = f"kvservice-transfer-{self.generation}/"
        calls = [
            handles[w].submit(
                "transfer_join",
                self.host,
                self.port,
                key,
                rank,
                len(members),
                backend,
                self.timeout_s,
                self.chunk_bytes,
                self.block_messages,
                self.copier,
                self.copy_programs,
                self.first_chunk_bytes,
                peer_copy,
            )  # fmt: skip
            for rank, w in enumerate(members)
        ]
        try:
            infos = resolve_all(calls)
        except BaseException:
            self.ranks = {}
            self.peer_pairs = set()
            raise
        self.ranks = {w: rank for rank, w in enumerate(members)}
        mapped = {
            (members[info["rank"]], members[peer]) for info in infos for peer in info["peers"]
        }
        self.peer_pairs = {frozenset(pair) for pair in mapped if pair[::-1] in mapped}
        self.backend = backend
        log.info(
            "transfer group %d: workers %s over %s, peer copy %s between %s",
            self.generation, members, backend, peer_copy, sorted(map(sorted, self.peer_pairs)),
        )  # fmt: skip
        return dict(self.ranks)

    def leave(self, handles: Mapping[int, WorkerHandle]) -> None:
        """Members still in ``handles`` leave the group (best effort: a gone one is gone)."""
        calls = [handles[w].submit("transfer_leave") for w in self.ranks if w in handles]
        self.ranks = {}
        self.peer_pairs = set()
        try:
            resolve_all(calls)
        except Exception:  # noqa: BLE001 - a worker that is gone has left
            log.warning("a worker could not leave the transfer group", exc_info=True)

    def joined(self, *worker_ids: int) -> bool:
        return all(w in self.ranks for w in worker_ids)

    def mapped(self, a: int, b: int) -> bool:
        """Whether workers ``a`` and ``b`` copy each other's GPU-tier blocks directly."""
        return frozenset((a, b)) in self.peer_pairs


def submit_transfer(
    transfer: TransferBlocks,
    handles: Mapping[int, WorkerHandle],
    group: TransferGroup | None,
    calls: list[PendingCall],
) -> str:
    """Submit the calls that copy the blocks (appended to ``calls``, in order); returns
    the path taken: "peer", "group", "host" or "none" (no blocks)."""
    if not transfer.blocks:
        return "none"
    src_id, dst_id = transfer.src_worker_id, transfer.dst_worker_id
    src, dst = handles[src_id], handles[dst_id]
    if group is not None and group.joined(src_id, dst_id):
        # (tier, block id) rows as int64 bytes: a list of hundreds of tuples is pickled and
        # unpickled element by element (~0.5 ms each way for 512 blocks). The receiver's
        # half goes first: the sender's first chunk cannot leave before the receiver has
        # posted for it (and by peer copy, the receiver is the side that copies).
        rows = itertools.chain.from_iterable(transfer.blocks)  # half np.array's time
        table = np.fromiter(rows, np.int64, 4 * len(transfer.blocks)).reshape(-1, 4)
        # As bytes: Ray passes bytes several times faster than an array (~80 us each).
        src_rows, dst_rows = table[:, :2].tobytes(), table[:, 2:].tobytes()
        # Peer copy: each side also gets the other's blocks (GPU tier on both sides only).
        peer = group.mapped(src_id, dst_id) and bool((table[:, [0, 2]] == Tier.GPU).all())
        recv_args = (src_rows,) if peer else ()
        send_args = (dst_rows,) if peer else ()
        calls.append(dst.submit("recv_blocks", group.ranks[src_id], dst_rows, *recv_args))
        calls.append(src.submit("send_blocks", group.ranks[dst_id], src_rows, *send_args))
        return "peer" if peer else "group"
    by_tiers: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for src_tier, src_block, dst_tier, dst_block in transfer.blocks:
        ids = by_tiers.setdefault((int(src_tier), int(dst_tier)), ([], []))
        ids[0].append(int(src_block))
        ids[1].append(int(dst_block))
    for (from_tier, to_tier), (src_ids, dst_ids) in sorted(by_tiers.items()):
        if isinstance(src, RayWorkerHandle) and isinstance(dst, RayWorkerHandle):
            export = src.submit("export_blocks", from_tier, src_ids)
            calls.append(export)  # resolved first: a lost source is named as such
            # The import takes the export's object reference: Ray hands the tensor from
            # actor to actor once it exists.
            calls.append(dst.submit("import_blocks", to_tier, dst_ids, export._ref))  # type: ignore[attr-defined]
        else:
            # A local export runs in this thread once the source's earlier calls have; the
            # batch's own earlier calls must run first, or they would wait on this one.
            resolve_all(calls)
            data = src.call("export_blocks", from_tier, src_ids)
            calls.append(dst.submit("import_blocks", to_tier, dst_ids, data))
    return "host"


def _node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:  # pragma: no cover - Ray is a dependency
        pass
    return "127.0.0.1"
