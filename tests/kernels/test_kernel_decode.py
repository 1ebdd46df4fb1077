"""Paged decode kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DEVICE,
    ON_CUDA,
    LaunchGuard,
    assert_attention_close,
    assert_lse_close,
    layer_views,
    lazy_huge_pool,
    make_pool,
    poisoned_like,
    random_page_tables,
)
from kvservice.kernels import choose_num_splits, decode, paged_decode, paged_decode_ref

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (dtype, Hq, Hkv, head_dim, block_size): every dtype, MHA/GQA/MQA, head_dim 64/128/256 and
# block sizes 8..256 appear; a group of 3 checks non-power-of-two padding.
CASES = [
    (FP32, 4, 4, 64, 16),
    (BF16, 8, 2, 128, 16),
    (FP16, 4, 1, 64, 8),
    (BF16, 4, 1, 256, 32),
    (FP16, 6, 2, 128, 64),
    (FP32, 2, 2, 256, 8),
    (BF16, 4, 2, 64, 256),
]
if ON_CUDA:
    CASES += [
        (BF16, 32, 8, 128, 16),
        (FP16, 32, 32, 128, 16),
        (BF16, 16, 1, 64, 128),
        (FP16, 8, 8, 256, 16),
    ]


def _lengths(block_size: int) -> list[int]:
    base = [1, block_size, 2 * block_size + 3, 37]
    if ON_CUDA:
        base += [1000, 16 * block_size, 2047, 5]
    return base


def _run(dtype, hq, hkv, d, bs, lengths, num_splits, layer=1):
    num_blocks = sum(-(-n // bs) for n in lengths) + 7
    pool = make_pool(num_blocks, 2, bs, hkv, d, dtype)
    k_cache, v_cache = layer_views(pool, layer)
    tables, lens = random_page_tables(lengths, bs, num_blocks)
    q = torch.randn(len(lengths), hq, d, device=DEVICE).to(dtype)
    out = poisoned_like(q)
    got, lse = paged_decode(
        q, k_cache, v_cache, tables, lens,
        return_lse=True, num_splits=num_splits, use_triton=True, out=out,
    )
    ref, ref_lse = paged_decode_ref(q, k_cache, v_cache, tables, lens, return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    assert_attention_close(got, ref, dtype)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("dtype,hq,hkv,d,bs", CASES)
def test_decode_matches_reference(dtype, hq, hkv, d, bs):
    _run(dtype, hq, hkv, d, bs, _lengths(bs), num_splits=None)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_counts_agree(num_splits):
    # More splits than a short sequence has tokens leaves empty splits: they must merge away.
    _run(BF16, 8, 2, 64, 16, [1, 16, 77, 130], num_splits=num_splits)


def test_decode_scale_and_plain_output():
    pool = make_pool(12, 1, 16, 2, 64, FP32)
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables([20, 33], 16, 12)
    q = torch.randn(2, 4, 64, device=DEVICE)
    got = paged_decode(q, k_cache, v_cache, tables, lens, scale=0.3, use_triton=True)
    ref = paged_decode_ref(q, k_cache, v_cache, tables, lens, scale=0.3)
    assert isinstance(got, torch.Tensor)
    assert_attention_close(got, ref, FP32)


def test_decode_empty_batch():
    pool = make_pool(4, 1, 16, 2, 64, FP16)
    k_cache, v_cache = layer_views(pool, 0)
    q = torch.empty(0, 4, 64, dtype=FP16, device=DEVICE)
    tables = torch.empty(0, 3, dtype=torch.int32, device=DEVICE)
    lens = torch.empty(0, dtype=torch.int32, device=DEVICE)
    out, lse = paged_decode(q, k_cache, v_cache, tables, lens, return_lse=True, use_triton=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_decode_cpu_path_matches_reference():
    pool = make_pool(8, 1, 8, 1, 64, FP32, device=torch.device("cpu"))
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables([9, 3], 8, 8, device=torch.device("cpu"))
    q = torch.randn(2, 2, 64)
    got = paged_decode(q, k_cache, v_cache, tables, lens)
    ref = paged_decode_ref(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(got, ref)


def test_decode_block_offsets_past_int32():
    # block_id * block_stride > 2**31 elements: 32-bit offsets would wrap to other blocks.
    bs, hkv, d = 16, 1, 64
    pool = lazy_huge_pool(2**31 + 2**20, (1, 2, bs, hkv, d), BF16)
    if pool is None:
        pytest.skip("the host refused a virtual pool past 2**31 elements")
    n = pool.shape[0]
    ids = [n - 1, n - 3, 5, n // 2 + 7]
    for i in ids:
        pool[i].normal_()
    k_cache, v_cache = layer_views(pool, 0)
    tables = torch.tensor([ids], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3 * bs + 5], dtype=torch.int32, device=DEVICE)
    assert ids[0] * k_cache.stride(0) > 2**31
    q = torch.randn(1, 2, d, device=DEVICE).to(BF16)
    for splits in (1, 2):
        got, lse = paged_decode(
            q, k_cache, v_cache, tables, lens, return_lse=True, num_splits=splits, use_triton=True
        )
        ref, ref_lse = paged_decode_ref(q, k_cache, v_cache, tables, lens, return_lse=True)
        assert_attention_close(got, ref, BF16)
        assert_lse_close(lse, ref_lse)


def test_choose_num_splits():
    assert choose_num_splits(256, 8, 2048, 132) == 1  # several waves already
    assert choose_num_splits(24, 8, 4096, 132) == 2  # a partial last wave, evened out
    assert choose_num_splits(33, 8, 4096, 132) == 1  # two programs per SM: the grid is full
    assert choose_num_splits(64, 8, 4096, 132) == 1  # no split, so no merge launch
    assert choose_num_splits(64, 8, 512, 132) == 1  # too short to be worth it
    assert choose_num_splits(16, 8, 4096, 132) == 4  # 512 programs: one wave of 4 per SM
    assert choose_num_splits(1, 8, 32768, 132) == 66
    assert choose_num_splits(1, 8, 300, 132) == 1  # no split shorter than 256 tokens


def test_one_split_writes_the_output_without_a_merge_launch(monkeypatch):
    def no_merge(*args, **kwargs):
        raise AssertionError("merge launched for a single split")

    monkeypatch.setattr(decode, "merge_splits", no_merge)
    pool = make_pool(24, 1, 8, 2, 64, FP16, device=DEVICE)
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables([9, 100, 17], 8, 24, device=DEVICE)  # 2 splits of 64
    q = torch.randn(3, 4, 64, device=DEVICE).to(FP16)
    got, lse = paged_decode(
        q, k_cache, v_cache, tables, lens, return_lse=True, num_splits=1, use_triton=True
    )
    ref, ref_lse = paged_decode_ref(q, k_cache, v_cache, tables, lens, return_lse=True)
    assert_attention_close(got, ref, FP16)
    assert_lse_close(lse, ref_lse)
    with pytest.raises(AssertionError, match="merge launched"):
        paged_decode(q, k_cache, v_cache, tables, lens, num_splits=2, use_triton=True)


def _valid_inputs(device=DEVICE):
    pool = make_pool(6, 1, 8, 2, 64, FP16, device=device)
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables([9, 16], 8, 6, device=device)
    q = torch.randn(2, 4, 64, device=device).to(FP16)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=lens)


def _bad(name, **changes):
    def build():
        args = _valid_inputs()
        for key, fn in changes.items():
            args[key] = fn(args[key])
        return args

    return pytest.param(build, id=name)


@pytest.mark.parametrize(
    "build",
    [
        _bad("q-dtype", q=lambda t: t.float()),
        _bad("q-2d", q=lambda t: t[0]),
        _bad("head-dim", q=lambda t: t[..., :32]),
        _bad("hq-not-multiple", q=lambda t: t[:, :3]),
        _bad("batch-mismatch", q=lambda t: t[:1]),
        _bad("table-dtype", block_tables=lambda t: t.long()),
        _bad("lens-dtype", seq_lens=lambda t: t.long()),
        _bad("block-id-high", block_tables=lambda t: t.clone().fill_(6)),
        _bad("block-id-negative", block_tables=lambda t: t.clone().fill_(-1)),
        _bad("len-zero", seq_lens=lambda t: torch.zeros_like(t)),
        _bad("len-past-table", seq_lens=lambda t: t + 100),
        _bad("v-shape", v_cache=lambda t: t[:, :, :1]),
        _bad("v-dtype", v_cache=lambda t: t.float()),
        _bad("head-dim-strided", k_cache=lambda t: t.transpose(2, 3)),
        _bad("device", q=lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")),
    ],
)
def test_decode_rejects_invalid_input_before_launch(build, monkeypatch):
    monkeypatch.setattr(decode, "_paged_decode_kernel", LaunchGuard())
    with pytest.raises(ValueError):
        paged_decode(**build(), use_triton=True)


def test_decode_rejects_bad_split_count(monkeypatch):
    monkeypatch.setattr(decode, "_paged_decode_kernel", LaunchGuard())
    with pytest.raises(ValueError):
        paged_decode(**_valid_inputs(), num_splits=0, use_triton=True)


def test_launch_falls_back_to_smaller_tiles_when_shared_memory_runs_out(monkeypatch):
    from triton.runtime.errors import OutOfResources

    launched = []
    real = decode._paged_decode_kernel

    class SmallSharedMemory:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                if meta["num_stages"] > 1:
                    raise OutOfResources(300_000, 200_000, "shared memory")
                launched.append(meta)
                return real[grid](*args, **meta)

            return launch

    monkeypatch.setattr(decode, "_paged_decode_kernel", SmallSharedMemory())
    _run(FP16, 4, 2, 64, 16, [5, 40], num_splits=2)
    assert launched and all(m["num_stages"] == 1 for m in launched)
