"""Paged extend (ragged causal prefill) kernel against its torch reference."""

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
from kvservice.kernels import extend, paged_extend, paged_extend_ref

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

CASES = [
    (FP32, 4, 4, 64, 16),
    (BF16, 8, 2, 128, 16),
    (FP16, 4, 1, 64, 8),
    (BF16, 2, 1, 256, 32),
    (FP16, 6, 2, 128, 64),
    (BF16, 2, 2, 64, 256),
]
if ON_CUDA:
    CASES += [(BF16, 32, 8, 128, 16), (FP32, 8, 2, 256, 16), (FP16, 16, 1, 64, 128)]


def _batch(block_size: int) -> tuple[list[int], list[int]]:
    """(q_lens, seq_lens): a 1-token step, a whole prompt, a chunk over a cached prefix,
    an exact block multiple and a sequence with no new tokens."""
    q_lens = [1, 21, 9, block_size, 0]
    seq_lens = [13, 21, 9 + 2 * block_size, 2 * block_size, 5]
    if ON_CUDA:
        q_lens += [700, 130, 1]
        seq_lens += [1500, 130, 2048]
    return q_lens, seq_lens


def _run(dtype, hq, hkv, d, bs, q_lens, seq_lens, window=None):
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 5
    pool = make_pool(num_blocks, 2, bs, hkv, d, dtype)
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables(seq_lens, bs, num_blocks)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    cu = cu.to(DEVICE)
    q = torch.randn(int(cu[-1]), hq, d, device=DEVICE).to(dtype)
    out = poisoned_like(q)
    got, lse = paged_extend(
        q, k_cache, v_cache, tables, cu, lens,
        sliding_window=window, return_lse=True, use_triton=True, out=out,
    )
    ref, ref_lse = paged_extend_ref(
        q, k_cache, v_cache, tables, cu, lens, sliding_window=window, return_lse=True
    )
    assert got.data_ptr() == out.data_ptr()
    assert_attention_close(got, ref, dtype)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("dtype,hq,hkv,d,bs", CASES)
def test_extend_matches_reference(dtype, hq, hkv, d, bs):
    _run(dtype, hq, hkv, d, bs, *_batch(bs))


@pytest.mark.parametrize("window", [1, 6, 40, 10_000])
def test_extend_sliding_window(window):
    _run(BF16, 4, 2, 64, 8, *_batch(8), window=window)


def test_extend_single_token_matches_decode_semantics():
    # q_len 1 at the end of each sequence is a decode step.
    _run(FP16, 4, 2, 64, 16, [1, 1, 1], [1, 16, 50])


def test_extend_empty_batch_and_no_rows():
    pool = make_pool(4, 1, 16, 2, 64, FP16)
    k_cache, v_cache = layer_views(pool, 0)
    q = torch.empty(0, 4, 64, dtype=FP16, device=DEVICE)
    tables = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.empty(0, dtype=torch.int32, device=DEVICE)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, lse = paged_extend(q, k_cache, v_cache, tables, cu, lens, return_lse=True, use_triton=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    # Sequences present but none with new tokens.
    tables, lens = random_page_tables([5, 9], 16, 4)
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = paged_extend(q, k_cache, v_cache, tables, cu, lens, use_triton=True)
    assert out.shape == (0, 4, 64)


def test_extend_block_offsets_past_int32():
    bs, hkv, d = 16, 1, 64
    pool = lazy_huge_pool(2**31 + 2**20, (1, 2, bs, hkv, d), BF16)
    if pool is None:
        pytest.skip("the host refused a virtual pool past 2**31 elements")
    n = pool.shape[0]
    ids = [n - 2, 3, n - 9]
    for i in ids:
        pool[i].normal_()
    k_cache, v_cache = layer_views(pool, 0)
    tables = torch.tensor([ids], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([2 * bs + 4], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)
    q = torch.randn(20, 2, d, device=DEVICE).to(BF16)
    got, lse = paged_extend(q, k_cache, v_cache, tables, cu, lens, return_lse=True, use_triton=True)
    ref, ref_lse = paged_extend_ref(q, k_cache, v_cache, tables, cu, lens, return_lse=True)
    assert_attention_close(got, ref, BF16)
    assert_lse_close(lse, ref_lse)


def _valid_inputs():
    pool = make_pool(6, 1, 8, 2, 64, FP16)
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables([9, 16], 8, 6)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    q = torch.randn(7, 4, 64, device=DEVICE).to(FP16)
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, cu_q_lens=cu, seq_lens=lens
    )


def _bad(name, extra=None, **changes):
    def build():
        args = _valid_inputs()
        for key, fn in changes.items():
            args[key] = fn(args[key])
        args.update(extra or {})
        return args

    return pytest.param(build, id=name)


@pytest.mark.parametrize(
    "build",
    [
        _bad("q-dtype", q=lambda t: t.bfloat16()),
        _bad("cu-dtype", cu_q_lens=lambda t: t.long()),
        _bad("cu-length", cu_q_lens=lambda t: t[:2]),
        _bad("cu-total", cu_q_lens=lambda t: t.clone().fill_(0)),
        _bad("cu-start", cu_q_lens=lambda t: t + 1),
        _bad("cu-decreasing", cu_q_lens=lambda t: torch.tensor([0, 8, 7], dtype=t.dtype, device=t.device)),
        _bad("qlen-past-seqlen", seq_lens=lambda t: torch.tensor([2, 16], dtype=t.dtype, device=t.device)),
        _bad("block-id-high", block_tables=lambda t: t.clone().fill_(99)),
        _bad("hq-not-multiple", q=lambda t: t[:, :3]),
        _bad("window-zero", extra={"sliding_window": 0}),
        _bad("device", cu_q_lens=lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")),
    ],
)
def test_extend_rejects_invalid_input_before_launch(build, monkeypatch):
    monkeypatch.setattr(extend, "_paged_extend_kernel", LaunchGuard())
    with pytest.raises(ValueError):
        paged_extend(**build(), use_triton=True)
