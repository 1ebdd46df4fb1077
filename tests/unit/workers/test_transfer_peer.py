"""Peer copy's mapping and checks without a process group: which peers a worker maps
(same host, same block shape, a handle that opens), that a mapped CPU pool is the peer's
memory itself, and that bad peer blocks are refused before any message."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.multiprocessing
from kvservice.workers.transfer_peer import PeerCopy, export_pool, host_identity, map_peers

from kvservice.core.errors import FailedPrecondition, InvalidArgument


class DictStore:
    """The two calls of a torch.distributed store that mapping uses."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def set(self, key: str, value: bytes) -> None:
        self.values[key] = value

    def get(self, key: str) -> bytes:
        return self.values[key]


@pytest.fixture(autouse=True)
def sharing_strategy() -> Iterator[None]:
    before = torch.multiprocessing.get_sharing_strategy()
    yield
    torch.multiprocessing.set_sharing_strategy(before)


def publish(store: DictStore, rank: int, host: str, pool: torch.Tensor) -> None:
    store.set(f"peer-pool/{rank}", pickle.dumps((host, export_pool(pool))))


def test_a_worker_maps_the_peers_of_its_host_that_open() -> None:
    store = DictStore()
    here = host_identity()
    peer = torch.zeros((6, 2, 4))
    publish(store, 1, here, peer)
    publish(store, 2, "another-host/boot", torch.zeros((6, 2, 4)))
    publish(store, 3, here, torch.zeros((6, 2, 4)))
    publish(store, 4, here, torch.zeros((6, 3, 4)))  # another block shape
    store.set("peer-pool/5", pickle.dumps((here, None)))  # a member that cannot share
    own = torch.ones((4, 2, 4))

    def opener(handle: bytes) -> torch.Tensor:
        pool = pickle.loads(handle)
        if pool.data_ptr() != peer.data_ptr():
            raise RuntimeError("cannot open")  # rank 3's
        return pool

    peers = map_peers(store, 0, 6, own, opener=opener)
    assert sorted(peers) == [1]
    assert "peer-pool/0" in store.values  # our own, for the others
    peers[1][2] = 7.0  # the peer's memory itself
    assert torch.equal(peer[2], torch.full((2, 4), 7.0))
    assert not peer[0].any()


def test_bad_peer_blocks_are_refused() -> None:
    pool = torch.zeros((8, 2, 4))
    copy = PeerCopy("push", pool, {1: torch.zeros((6, 2, 4))}, torch.device("cpu"))
    own = np.array([[0, 1], [0, 2]], dtype=np.int64)
    assert copy.check(1, own, [(0, 5), (0, 0)], sending=True).tolist() == [[0, 5], [0, 0]]
    with pytest.raises(FailedPrecondition, match="not mapped"):
        copy.check(2, own, [(0, 5), (0, 0)], sending=True)
    for theirs in (
        [(0, 6), (0, 0)],
        [(0, -1), (0, 0)],
        [(1, 5), (0, 0)],
        [(0, 5)],
        [(0, 1.5), (0, 2)],
    ):
        with pytest.raises(InvalidArgument):
            copy.check(1, own, theirs, sending=True)
    with pytest.raises(InvalidArgument, match="twice"):
        copy.check(1, own, [(0, 5), (0, 5)], sending=True)  # pushing: the peer's are written
    copy.check(1, own, [(0, 5), (0, 5)], sending=False)  # receiving: a source may repeat
    with pytest.raises(InvalidArgument, match="GPU-tier"):
        copy.check(1, np.array([[1, 1], [0, 2]]), [(0, 5), (0, 0)], sending=True)
    with pytest.raises(InvalidArgument, match="peer_copy"):
        PeerCopy("sideways", pool, {}, torch.device("cpu"))
    off = PeerCopy("off", pool, {1: torch.zeros((6, 2, 4))}, torch.device("cpu"))
    with pytest.raises(FailedPrecondition):
        off.check(1, own, [(0, 5), (0, 0)], sending=True)


def test_who_copies() -> None:
    pool = torch.zeros((2, 1))
    push = PeerCopy("push", pool, {}, torch.device("cpu"))
    pull = PeerCopy("pull", pool, {}, torch.device("cpu"))
    assert push.copies(sending=True) and not push.copies(sending=False)
    assert pull.copies(sending=False) and not pull.copies(sending=True)


def test_a_pool_that_cannot_be_shared_maps_no_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvservice.workers.transfer_peer as transfer_peer

    store = DictStore()
    publish(store, 1, host_identity(), torch.zeros((6, 2, 4)))

    def refuse(pool: torch.Tensor) -> bytes:
        raise RuntimeError("expandable segments cannot be shared")

    monkeypatch.setattr(transfer_peer, "export_pool", refuse)
    assert map_peers(store, 0, 2, torch.zeros((4, 2, 4))) == {}
    assert pickle.loads(store.get("peer-pool/0"))[1] is None  # the peer learns it too
