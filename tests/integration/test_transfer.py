"""Block transfers between two CPU worker actors: over a gloo process group (the same
code NCCL runs between GPUs) and through host memory; mixed tiers, scattered and
consecutive blocks, many pipelined chunks, the plain send/recv probe, and a group formed
again (a new generation) still pairing sends with receives; peer copy over shared memory
and, with two GPUs, through CUDA IPC between GPU actors over NCCL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kvservice.workers import WorkerGroup, start_worker_actors, stop_worker_actors

from kvservice.coordinator_workers import RayWorkerHandle, resolve_all
from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import BlockId, Tier, WorkerId
from kvservice.core.layout import Layout
from kvservice.core.migration import TransferBlocks
from kvservice.transfers import TransferGroup, submit_transfer

pytestmark = pytest.mark.integration

LAYOUT = Layout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)
NAMESPACE = "kvservice-test-transfer"
GPU, CPU = Tier.GPU, Tier.CPU


@pytest.fixture(scope="module")
def actors(ray_cluster: None) -> Iterator[WorkerGroup]:
    group = start_worker_actors(
        LAYOUT, 2, use_gpu=False, namespace=NAMESPACE, detached=False, max_restarts=0,
        num_gpu_blocks=32, num_cpu_blocks=8,
    )  # fmt: skip
    try:
        yield group
    finally:
        stop_worker_actors(group)


@pytest.fixture(scope="module")
def handles(actors: WorkerGroup) -> dict[int, RayWorkerHandle]:
    out = {w: RayWorkerHandle(w, a) for w, a in actors.actors.items()}
    for handle in out.values():
        handle.call("info")  # learns the epoch: every later call is fenced, as a coordinator's
    return out


def fill(handle: RayWorkerHandle, seed: int) -> dict[Tier, torch.Tensor]:
    """Random contents in every block of both tiers; returns them."""
    gen = torch.Generator().manual_seed(seed)
    data = {}
    for tier, count in ((GPU, 32), (CPU, 8)):
        data[tier] = torch.randn((count, *LAYOUT.block_shape), generator=gen)
        handle.call("import_blocks", tier, list(range(count)), data[tier])
    return data


def moves(*spec: tuple[Tier, int, Tier, int]) -> TransferBlocks:
    blocks = tuple((st, BlockId(sb), dt, BlockId(db)) for st, sb, dt, db in spec)
    return TransferBlocks(WorkerId(0), WorkerId(1), blocks)


def run(
    transfer: TransferBlocks, handles: dict[int, RayWorkerHandle], group: TransferGroup | None
) -> str:
    calls: list = []
    path = submit_transfer(transfer, handles, group, calls)
    resolve_all(calls)
    return path


def check(
    handles: dict[int, RayWorkerHandle], transfer: TransferBlocks, sent: dict[Tier, torch.Tensor]
) -> None:
    for src_tier, src_block, dst_tier, dst_block in transfer.blocks:
        got = handles[1].call("export_blocks", dst_tier, [dst_block])[0]
        assert torch.equal(got, sent[src_tier][src_block]), (
            src_tier,
            src_block,
            dst_tier,
            dst_block,
        )


SCATTERED = moves(
    *(
        (GPU, b, GPU, d)
        for b, d in zip([9, 2, 30, 17, 4, 5, 6, 7], [1, 20, 3, 31, 10, 11, 12, 13], strict=True)
    ),
    (CPU, 3, GPU, 25),
    (GPU, 0, CPU, 6),
    (CPU, 7, CPU, 0),
)


@pytest.mark.parametrize(
    "block_messages,copier,first_chunk_blocks",
    [
        (False, "triton", None),
        (False, "torch", None),
        (False, "engine", None),
        (True, "triton", None),
        (False, "triton", 1),
    ],
)
def test_blocks_cross_the_group_in_pipelined_chunks(
    handles: dict[int, RayWorkerHandle],
    block_messages: bool,
    copier: str,
    first_chunk_blocks: int | None,
) -> None:
    # Blocks gathered into chunks (by each copier), or one message per block grouped per
    # chunk; with first_chunk_blocks, chunks of 1, 2, 2, ... 2, 2, 1 blocks.
    first = None if first_chunk_blocks is None else first_chunk_blocks * LAYOUT.block_bytes
    group = TransferGroup(
        "127.0.0.1", timeout_s=30, chunk_bytes=2 * LAYOUT.block_bytes,
        block_messages=block_messages, copier=copier, copy_programs=2, first_chunk_bytes=first,
    )  # fmt: skip
    ranks = group.form(handles, {0: "cpu", 1: "cpu"})
    assert ranks == {0: 0, 1: 1} and group.backend == "gloo"
    info = handles[1].call("transfer_info")
    assert (info["rank"], info["world_size"], info["backend"]) == (1, 2, "gloo")
    assert info["block_messages"] is block_messages
    assert (info["copier"], info["copy_programs"]) == (copier, 2)
    assert info["first_chunk_bytes"] == first
    # Bad blocks are refused before anything is sent (the peer is not left waiting).
    for bad in ([(0, 32)], [(0, -1)], [(2, 0)], [(0, 1.5)], [(0,)], [(1, 8)]):
        with pytest.raises(InvalidArgument):
            handles[0].call("send_blocks", 1, bad)
    sent = fill(handles[0], seed=1)
    fill(handles[1], seed=2)
    received_before = handles[1].call("stats")["blocks_received"]
    assert run(SCATTERED, handles, group) == "group"  # 11 blocks in 6 chunks of 2
    check(handles, SCATTERED, sent)
    # The host time of each phase of the last transfer, on the shared host clock.
    phases = handles[1].call("transfer_info")["last_ms"]["recv"]
    started = phases.pop("started_s")
    sender_started = handles[0].call("transfer_info")["last_ms"]["send"]["started_s"]
    assert abs(started - sender_started) < 5.0  # one clock for both processes
    parts = {"queue_index", "queue_post", "queue_wait", "queue_copy"}  # within the queuing
    steps = {"check", "queue", "device_wait"}
    assert set(phases) == steps | parts | {"total"}
    assert all(ms >= 0 for ms in phases.values())
    assert sum(phases[k] for k in parts) <= phases["queue"]
    assert sum(phases[k] for k in steps) == pytest.approx(phases["total"], abs=0.01)
    consecutive = moves(*((GPU, b, GPU, 16 + b) for b in range(8)))  # sent from the pool itself
    assert run(consecutive, handles, group) == "group"
    check(handles, consecutive, sent)
    stats = handles[1].call("stats")
    assert stats["blocks_received"] - received_before == 19
    # A new generation of the group (as after a worker joins) pairs up again.
    assert group.form(handles, {0: "cpu", 1: "cpu"}) == {0: 0, 1: 1} and group.generation == 2
    sent = fill(handles[0], seed=3)
    assert run(SCATTERED, handles, group) == "group"
    check(handles, SCATTERED, sent)
    for pieces in (1, 3):  # one message, or three aligned ones queued together
        seconds = resolve_all(
            [
                handles[0].submit("transfer_probe", 1, 1 << 16, True, 3, pieces),
                handles[1].submit("transfer_probe", 0, 1 << 16, False, 3, pieces),
            ]
        )
        assert all(s > 0 for s in seconds)
    group.leave(handles)
    assert handles[0].call("transfer_info")["rank"] is None


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_gpu_tier_blocks_go_by_peer_copy_between_mapped_workers(
    handles: dict[int, RayWorkerHandle], mode: str
) -> None:
    # CPU workers map each other's pools through shared memory (CUDA IPC between GPUs):
    # the same messages and copy, on gloo.
    peer_copy_round(handles, "cpu", mode)


@pytest.fixture(scope="module")
def gpu_handles(ray_cluster: None) -> Iterator[dict[int, RayWorkerHandle]]:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    group = start_worker_actors(
        LAYOUT, 2, use_gpu=True, namespace=f"{NAMESPACE}-gpu", detached=False, max_restarts=0,
        num_gpu_blocks=32, num_cpu_blocks=8,
    )  # fmt: skip
    try:
        out = {w: RayWorkerHandle(w, a) for w, a in group.actors.items()}
        for handle in out.values():
            handle.call("info")
        yield out
    finally:
        stop_worker_actors(group)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "push"])
def test_gpu_workers_copy_blocks_through_cuda_ipc(
    gpu_handles: dict[int, RayWorkerHandle], mode: str | None
) -> None:
    # Two actors of one GPU each (each sees its own as cuda:0) map each other's pools
    # through CUDA IPC; None: the default over NCCL (pull).
    peer_copy_round(gpu_handles, "cuda:0", mode)


def peer_copy_round(handles: dict[int, RayWorkerHandle], device: str, mode: str | None) -> None:
    """Peer copy in ``mode`` between the two workers: GPU-tier transfers by peer copy,
    others chunked, bad peer blocks refused on both sides, then peer copy off."""
    devices = {0: device, 1: device}
    group = TransferGroup(
        "127.0.0.1", timeout_s=30, chunk_bytes=2 * LAYOUT.block_bytes, peer_copy=mode
    )
    assert group.form(handles, devices) == {0: 0, 1: 1}
    assert group.mapped(0, 1) and group.mapped(1, 0)
    for w, peers in ((0, [1]), (1, [0])):
        info = handles[w].call("transfer_info")
        assert (info["peer_copy"], info["peers"]) == (mode or "pull", peers)
    sent = fill(handles[0], seed=6)
    fill(handles[1], seed=7)
    received_before = handles[1].call("stats")["blocks_received"]
    gpu_only = moves(*((GPU, b, GPU, d) for b, d in ((9, 1), (2, 20), (30, 3), (9, 31), (4, 10))))
    assert run(gpu_only, handles, group) == "peer"
    check(handles, gpu_only, sent)
    assert handles[1].call("stats")["blocks_received"] - received_before == 5
    # A transfer naming CPU-tier blocks takes the chunked path of the same group.
    assert run(SCATTERED, handles, group) == "group"
    check(handles, SCATTERED, sent)
    # Bad peer blocks are refused on either side before any message (both sides check the
    # same), and nothing moves.
    before = handles[1].call("export_blocks", GPU, [1, 2])
    for side, own, theirs in (
        ("send_blocks", [(0, 1)], [(0, 32)]),  # out of the peer's range
        ("recv_blocks", [(0, 1)], [(1, 0)]),  # a CPU-tier block
        ("send_blocks", [(0, 1), (0, 2)], [(0, 5), (0, 5)]),  # one destination twice
        ("recv_blocks", [(0, 1), (0, 2)], [(0, 3)]),  # not one per block
    ):
        with pytest.raises(InvalidArgument):
            handles[1 if side == "recv_blocks" else 0].call(
                side, 0 if side == "recv_blocks" else 1, own, theirs
            )
    assert torch.equal(handles[1].call("export_blocks", GPU, [1, 2]), before)
    # Without peer copy the same group's transfers are chunked again.
    group.peer_copy = "off"
    group.form(handles, devices)
    assert not group.mapped(0, 1) and handles[0].call("transfer_info")["peers"] == []
    sent = fill(handles[0], seed=8)
    assert run(gpu_only, handles, group) == "group"
    check(handles, gpu_only, sent)
    group.leave(handles)


def test_a_bad_copier_is_refused_and_changes_nothing(
    handles: dict[int, RayWorkerHandle],
) -> None:
    for copier, programs, first in (
        ("memcpy", None, None),
        ("triton", 0, None),
        ("triton", None, 0),
        ("triton", None, -(1 << 20)),
    ):
        with pytest.raises(InvalidArgument):
            handles[0].call(
                "transfer_join", "127.0.0.1", 1, "bad/", 0, 1, "gloo", 5.0, 1 << 20, False,
                copier, programs, first,
            )  # fmt: skip
        assert handles[0].call("transfer_info")["rank"] is None


def test_without_a_group_blocks_go_through_host_memory(handles: dict[int, RayWorkerHandle]) -> None:
    sent = fill(handles[0], seed=4)
    fill(handles[1], seed=5)
    assert run(SCATTERED, handles, None) == "host"
    check(handles, SCATTERED, sent)
    assert run(moves(), handles, None) == "none"


def test_a_worker_outside_any_group_refuses_a_transfer(handles: dict[int, RayWorkerHandle]) -> None:
    from kvservice.core.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="no transfer group"):
        handles[0].call("send_blocks", 1, [(0, 1)])
