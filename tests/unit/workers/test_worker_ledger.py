"""Worker identity, pool sizing and the ledger a restarted coordinator rebuilds from."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from kvservice.workers import Worker
from worker_helpers import LAYOUT, make_worker

from kvservice.core.errors import InvalidArgument
from kvservice.core.ids import BlockHash, BlockId, SeqId, TenantId, Tier
from kvservice.core.layout import Layout
from kvservice.core.records import BlockRecord, PinRecord, SeqRecord


def record(seq_id: int, gpu: list[int], cpu: list[int] = (), pinned: list[int] = ()) -> SeqRecord:
    blocks = tuple(BlockRecord(BlockId(b), Tier.GPU, BlockHash(b * 7)) for b in gpu) + tuple(
        BlockRecord(BlockId(b), Tier.CPU) for b in cpu
    )
    pin = PinRecord(tuple(BlockRecord(BlockId(b), Tier.GPU) for b in pinned)) if pinned else None
    return SeqRecord(
        seq_id=SeqId(seq_id),
        tenant=TenantId("t"),
        tokens=tuple(range(4 * (len(gpu) + len(cpu)))),
        blocks=blocks,
        num_computed_tokens=4,
        pin=pin,
    )


def test_info_names_the_worker_and_a_fresh_epoch_each_time() -> None:
    first, second = make_worker(3), make_worker(3)
    info = first.info()
    assert (info.worker_id, info.device, info.layout) == (3, "cpu", LAYOUT)
    assert (info.num_gpu_blocks, info.num_cpu_blocks) == (32, 8)
    assert info.epoch != second.info().epoch
    assert pickle.loads(pickle.dumps(info)) == info


def test_pools_have_the_layout_shape_and_start_zeroed() -> None:
    worker = make_worker()
    assert worker.gpu_pool.shape == (32, *LAYOUT.block_shape)
    assert worker.cpu_pool.shape == (8, *LAYOUT.block_shape)
    assert worker.gpu_pool.dtype == worker.cpu_pool.dtype == torch.float32
    assert not worker.cpu_pool.is_pinned()  # no CUDA here: nothing to pin for
    assert torch.count_nonzero(worker.gpu_pool) == 0


def test_pools_sized_by_memory() -> None:
    bf16 = Layout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_size=4)
    worker = Worker(0, bf16, num_gpu_blocks=4, cpu_pool_gib=bf16.block_bytes * 10.5 / 2**30)
    assert worker.num_cpu_blocks == 10
    assert worker.cpu_pool.dtype == torch.bfloat16
    assert Worker(0, bf16, num_gpu_blocks=4).num_cpu_blocks == 0
    # on a CPU worker the fraction is of host memory
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    worker = Worker(0, bf16, gpu_mem_fraction=bf16.block_bytes * 5.5 / host_bytes)
    assert worker.num_gpu_blocks == 5
    with pytest.raises(InvalidArgument, match="no room"):
        Worker(0, bf16, gpu_mem_fraction=bf16.block_bytes * 0.5 / host_bytes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs num_gpu_blocks"),
        ({"num_gpu_blocks": 0}, "num_gpu_blocks"),
        ({"num_gpu_blocks": 4, "gpu_mem_fraction": 0.5}, "not both"),
        ({"num_gpu_blocks": 4, "num_cpu_blocks": -1}, "num_cpu_blocks"),
        ({"num_gpu_blocks": 4, "num_cpu_blocks": 2, "cpu_pool_gib": 1.0}, "not both"),
        ({"gpu_mem_fraction": 1.5}, "gpu_mem_fraction"),
        ({"num_gpu_blocks": 4, "device": "meta"}, "device"),
        ({"num_gpu_blocks": 4, "decode_graphs": -1}, "decode_graphs"),
        ({"num_gpu_blocks": 4, "decode_graphs": True}, "decode_graphs"),
        ({"num_gpu_blocks": 4, "device": "cuda:0"}, "CUDA"),
    ],
)
def test_bad_construction_is_refused(kwargs: dict, match: str) -> None:
    if "device" in kwargs and kwargs["device"].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(InvalidArgument, match=match):
        Worker(0, LAYOUT, **kwargs)


def test_ledger_upserts_replaces_and_deletes() -> None:
    worker = make_worker()
    epoch = worker.info().epoch
    assert worker.ledger().epoch == epoch and worker.ledger().records == {}
    a, b = record(1, [0, 1]), record(2, [2], cpu=[0], pinned=[5])
    worker.update_ledger({1: a, 2: b}, [])
    assert worker.ledger().records == {1: a, 2: b}
    a2 = record(1, [0, 1, 3])
    worker.update_ledger({1: a2}, [2, 99])  # unknown deletes are ignored
    ledger = worker.ledger()
    assert ledger.records == {1: a2}
    assert pickle.loads(pickle.dumps(ledger)) == ledger
    # the returned ledger is a copy
    ledger.records.clear()
    assert worker.ledger().records == {1: a2}


def test_stats_count_the_blocks_the_ledger_holds() -> None:
    worker = make_worker()
    worker.update_ledger({1: record(1, [0, 1]), 2: record(2, [1, 2], cpu=[0], pinned=[9])}, [])
    tiers = worker.stats()["tiers"]
    assert tiers["gpu"]["blocks_in_ledger"] == 4  # 0, 1, 2 and the pinned 9
    assert tiers["cpu"]["blocks_in_ledger"] == 1
    assert worker.stats()["num_sequences"] == 2


@pytest.mark.parametrize(
    "upserts, deletes, match",
    [
        ({1: "not a record"}, [], "SeqRecord"),
        ({1: record(2, [0])}, [], "names seq_id 2"),
        ({1: record(1, [32])}, [], "outside"),
        ({1: record(1, [0], cpu=[8])}, [], "outside"),
        ({1: record(1, [0], pinned=[40])}, [], "outside"),
        ({-1: record(-1, [0])}, [], "outside"),
        ({1: record(1, [0])}, [1], "both upserted and deleted"),
        ({1: record(1, [0])}, "1", "deletes must be a list"),
        ([record(1, [0])], [], "upserts must be a dict"),
    ],
)
def test_bad_ledger_updates_change_nothing(upserts, deletes, match) -> None:
    worker = make_worker()
    kept = record(7, [4])
    worker.update_ledger({7: kept}, [])
    with pytest.raises(InvalidArgument, match=match):
        worker.update_ledger(
            upserts if isinstance(upserts, list) else {7: kept, **upserts}, deletes
        )
    assert worker.ledger().records == {7: kept}


def test_progress_updates_fold_into_the_records_when_read() -> None:
    worker = make_worker()
    a, b = record(1, [0, 1]), record(2, [2])
    worker.update_ledger({1: a, 2: b}, [])
    worker.update_progress({1: 7, 99: 3})  # an unknown sequence is ignored
    assert worker.ledger().records[1].num_computed_tokens == 7
    assert worker.ledger().records[2] == b
    worker.update_progress({1: 8})
    worker.update_ledger({1: a}, [])  # a later whole record replaces the progress
    assert worker.ledger().records[1] == a
    worker.update_progress({2: 2})
    worker.update_ledger({}, [2])
    assert set(worker.ledger().records) == {1}


@pytest.mark.parametrize(
    "progress, match",
    [
        ({1: 9}, "within its 8 tokens"),
        ({1: -1}, "within"),
        ({1: "3"}, "within"),
        ({-1: 2}, "progress key"),
        ([(1, 2)], "progress must be a dict"),
    ],
)
def test_bad_progress_updates_change_nothing(progress, match) -> None:
    worker = make_worker()
    kept = record(1, [0, 1])
    worker.update_ledger({1: kept}, [])
    with pytest.raises(InvalidArgument, match=match):
        worker.update_progress(progress)
    assert worker.ledger().records == {1: kept}
