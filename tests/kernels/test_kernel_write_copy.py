"""KV write and copy-on-write block copy against their references (bit-exact)."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import DEVICE, ON_CUDA, LaunchGuard, layer_views, lazy_huge_pool, make_pool
from kvservice.kernels import (
    RowCopy,
    copy,
    copy_blocks,
    copy_blocks_ref,
    copy_rows,
    write_kv,
    write_kv_ref,
)

# The package's ``write_kv`` attribute is the function; the module holds the kernel.
write_kv_mod = importlib.import_module("kvservice.kernels.write_kv")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _slots(num_tokens: int, num_slots: int, num_skipped: int) -> torch.Tensor:
    slots = torch.randperm(num_slots)[:num_tokens]
    slots[torch.randperm(num_tokens)[:num_skipped]] = -1
    return slots.to(DEVICE)


@pytest.mark.parametrize(
    "dtype,hkv,d,bs",
    [(BF16, 8, 128, 16), (FP16, 1, 64, 8), (FP32, 2, 256, 32), (BF16, 3, 64, 256)],
)
def test_write_kv_matches_reference(dtype, hkv, d, bs):
    num_blocks, tokens = (40, 256) if ON_CUDA else (12, 24)
    pool = make_pool(num_blocks, 3, bs, hkv, d, dtype)
    expected = pool.clone()
    k = torch.randn(tokens, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(tokens, hkv, d, device=DEVICE).to(dtype)
    slots = _slots(tokens, num_blocks * bs, num_skipped=3)
    write_kv(*layer_views(pool, 1), k, v, slots, use_triton=True)
    write_kv_ref(*layer_views(expected, 1), k, v, slots)
    # Bit-exact, and every other layer and slot untouched.
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))
    kept = slots >= 0
    assert torch.equal(layer_views(pool, 1)[0][slots[kept] // bs, slots[kept] % bs], k[kept])


def test_write_kv_strided_rows_and_empty():
    pool = make_pool(4, 1, 8, 2, 64, FP16)
    kv = torch.randn(5, 2, 2, 64, device=DEVICE).to(FP16)
    k, v = kv[:, 0], kv[:, 1]  # row stride 256, not contiguous
    slots = _slots(5, 32, num_skipped=0)
    expected = pool.clone()
    write_kv(*layer_views(pool, 0), k, v, slots, use_triton=True)
    write_kv_ref(*layer_views(expected, 0), k, v, slots)
    assert torch.equal(pool, expected)
    empty = torch.empty(0, 2, 64, dtype=FP16, device=DEVICE)
    write_kv(
        *layer_views(pool, 0),
        empty,
        empty,
        torch.empty(0, dtype=torch.int64, device=DEVICE),
        use_triton=True,
    )
    assert torch.equal(pool, expected)


def test_write_kv_slots_past_int32():
    bs, hkv, d = 16, 1, 64
    pool = lazy_huge_pool(2**31 + 2**20, (1, 2, bs, hkv, d), BF16)
    if pool is None:
        pytest.skip("the host refused a virtual pool past 2**31 elements")
    k_cache, v_cache = layer_views(pool, 0)
    last = pool.shape[0] - 1
    slots = torch.tensor([last * bs + 3, 7, -1, (last - 1) * bs], device=DEVICE)
    k = torch.randn(4, hkv, d, device=DEVICE).to(BF16)
    v = torch.randn(4, hkv, d, device=DEVICE).to(BF16)
    write_kv(k_cache, v_cache, k, v, slots, use_triton=True)
    assert torch.equal(k_cache[last, 3], k[0]) and torch.equal(v_cache[last, 3], v[0])
    assert torch.equal(k_cache[last - 1, 0], k[3]) and torch.equal(v_cache[0, 7], v[1])


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda a: a.update(k=a["k"].float()), id="k-dtype"),
        pytest.param(lambda a: a.update(v=a["v"][:2]), id="v-rows"),
        pytest.param(lambda a: a.update(k=a["k"][:, :1]), id="k-heads"),
        pytest.param(lambda a: a.update(slot_mapping=a["slot_mapping"].int()), id="slot-dtype"),
        pytest.param(lambda a: a.update(slot_mapping=a["slot_mapping"] + 1000), id="slot-high"),
        pytest.param(
            lambda a: a.update(slot_mapping=a["slot_mapping"] * 0 - 2), id="slot-negative"
        ),
        pytest.param(lambda a: a.update(slot_mapping=a["slot_mapping"] * 0 + 3), id="slot-twice"),
        pytest.param(
            lambda a: a.update(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)),
            id="k-strided-dim",
        ),
    ],
)
def test_write_kv_rejects_invalid_input_before_launch(change, monkeypatch):
    monkeypatch.setattr(write_kv_mod, "_write_kv_kernel", LaunchGuard())
    pool = make_pool(4, 1, 8, 2, 64, FP16)
    k_cache, v_cache = layer_views(pool, 0)
    args = dict(
        k_cache=k_cache,
        v_cache=v_cache,
        k=torch.randn(3, 2, 64, device=DEVICE).to(FP16),
        v=torch.randn(3, 2, 64, device=DEVICE).to(FP16),
        slot_mapping=torch.tensor([0, 9, -1], device=DEVICE),
    )
    change(args)
    with pytest.raises(ValueError):
        write_kv(**args, use_triton=True)


@pytest.mark.parametrize(
    "dtype,block_shape",
    [(BF16, (2, 2, 16, 2, 64)), (FP32, (1, 2, 8, 1, 64)), (FP16, (3, 2, 1, 1, 5))],
)
def test_copy_blocks_matches_reference(dtype, block_shape):
    num_blocks = 40 if ON_CUDA else 16
    pool = torch.randn((num_blocks, *block_shape), device=DEVICE).to(dtype)
    expected = pool.clone()
    perm = torch.randperm(num_blocks)
    pairs = torch.stack([perm[:5], perm[5:10]], dim=1)
    copy_blocks(pool, pairs, use_triton=True)
    copy_blocks_ref(expected, pairs.to(DEVICE))
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))
    # The same source may feed several destinations (a fork's copies).
    fan_out = torch.tensor([[perm[0], perm[11]], [perm[0], perm[12]]])
    copy_blocks(pool, fan_out, use_triton=True)
    assert torch.equal(pool[perm[11]], pool[perm[0]]) and torch.equal(pool[perm[12]], pool[perm[0]])
    copy_blocks(pool, torch.empty(0, 2, dtype=torch.int64), use_triton=True)


def test_copy_blocks_past_int32_words():
    # An odd block size in bytes forces 2-byte words, so 2**31 words fit in 4 GiB.
    pool = lazy_huge_pool(2**31 + 2**20, (3,), BF16)
    if pool is None:
        pytest.skip("the host refused a virtual pool past 2**31 elements")
    last = pool.shape[0] - 1
    pool[last] = torch.tensor([1.0, 2.0, 3.0], dtype=BF16)
    pool[4] = torch.tensor([7.0, 8.0, 9.0], dtype=BF16)
    copy_blocks(pool, torch.tensor([[last, 2], [4, last - 1]]), use_triton=True)
    assert pool[2].tolist() == [1.0, 2.0, 3.0] and pool[last - 1].tolist() == [7.0, 8.0, 9.0]


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([[0, 16]], id="dst-high"),
        pytest.param([[-1, 3]], id="src-negative"),
        pytest.param([[0, 3], [1, 3]], id="dst-twice"),
        pytest.param([[0, 3], [3, 4]], id="dst-is-src"),
        pytest.param([[0, 3, 4]], id="shape"),
    ],
)
def test_copy_blocks_rejects_invalid_pairs_before_launch(pairs, monkeypatch):
    monkeypatch.setattr(copy, "_copy_blocks_kernel", LaunchGuard())
    pool = make_pool(16, 1, 8, 1, 64, FP16)
    with pytest.raises(ValueError):
        copy_blocks(pool, torch.tensor(pairs), use_triton=True)
    with pytest.raises(ValueError):
        copy_blocks(pool, torch.tensor([[0, 1]], dtype=torch.int32), use_triton=True)
    with pytest.raises(ValueError):
        copy_blocks(pool[:, :, 0], torch.tensor([[0, 1]]), use_triton=True)


@pytest.mark.parametrize("programs", [None, 1, 3])
def test_copy_rows_gathers_and_scatters_like_indexing(programs):
    # Blocks of 2,560 words: two chunks each, the second partial, so with few programs
    # every program loops over items of several blocks.
    block_shape = (1, 2, 16, 2, 160)
    pool = torch.randn((12, *block_shape), device=DEVICE).to(BF16)
    staging = torch.zeros((5, *block_shape), dtype=BF16, device=DEVICE)
    blocks = torch.tensor([9, 2, 7, 0, 11])
    gather = torch.stack([blocks, torch.arange(5)], dim=1)
    copy_rows(pool, staging, gather, programs=programs, use_triton=True)
    assert torch.equal(staging.view(torch.uint8), pool[blocks.to(DEVICE)].view(torch.uint8))
    back = torch.zeros_like(pool)
    copy_rows(staging, back, gather.flip(1), programs=programs, use_triton=True)
    assert torch.equal(back[blocks.to(DEVICE)], staging)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[blocks] = False
    assert not back[untouched.to(DEVICE)].any()


@pytest.mark.parametrize("use_triton", [True, False])
def test_a_prepared_row_copy_copies_each_pair_list_like_indexing(use_triton):
    # One RowCopy per direction, called for several chunks' pairs, as a transfer does.
    block_shape = (1, 2, 16, 2, 160)
    pool = torch.randn((12, *block_shape), device=DEVICE).to(BF16)
    staging = torch.zeros((4, *block_shape), dtype=BF16, device=DEVICE)
    gather = RowCopy(pool, staging, programs=2, use_triton=use_triton)
    back = torch.zeros_like(pool)
    scatter = RowCopy(staging, back, programs=2, use_triton=use_triton)
    for chunk in ([9, 2, 7], [0, 11, 5, 3]):
        blocks = torch.tensor(chunk)
        pairs = torch.stack([blocks, torch.arange(len(chunk))], dim=1).to(DEVICE)
        gather(pairs)
        assert torch.equal(staging[: len(chunk)], pool[blocks.to(DEVICE)])
        scatter(pairs.flip(1).contiguous())
        assert torch.equal(back[blocks.to(DEVICE)], pool[blocks.to(DEVICE)])
    with pytest.raises(ValueError):
        RowCopy(pool, staging.to(FP16), use_triton=use_triton)  # checked once, up front


def test_copy_rows_rejects_bad_arguments_before_launch(monkeypatch):
    monkeypatch.setattr(copy, "_copy_blocks_kernel", LaunchGuard())
    pool = make_pool(8, 1, 8, 1, 64, FP16)
    staging = torch.zeros((2, *pool.shape[1:]), dtype=FP16, device=DEVICE)
    ok = torch.tensor([[0, 1]])
    for src, dst, pairs, programs in (
        (pool, staging, torch.tensor([[0, 2]]), None),  # destination past the staging rows
        (pool, staging, torch.tensor([[8, 0]]), None),  # source past the pool
        (pool, staging.to(BF16), ok, None),  # dtype differs
        (pool, staging[:, :, 0], ok, None),  # block shape differs
        (pool, staging, ok, 0),  # no programs
    ):
        with pytest.raises(ValueError):
            copy_rows(src, dst, pairs, programs=programs, use_triton=True)
    assert not staging.any()
