"""Swap between pools and merge of partial attention states, against their references."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DEVICE,
    ON_CUDA,
    LaunchGuard,
    assert_attention_close,
    layer_views,
    make_pool,
    random_page_tables,
)
from kvservice.kernels import (
    SwapHandle,
    copy,
    merge_attn_states,
    merge_attn_states_ref,
    paged_decode_ref,
    swap_blocks,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CPU = torch.device("cpu")


def _pairs(num_pairs: int, num_src: int, num_dst: int) -> torch.Tensor:
    return torch.stack(
        [torch.randperm(num_src)[:num_pairs], torch.randperm(num_dst)[:num_pairs]], dim=1
    )


# The kernel reaches host pools only through the interpreter; on a GPU machine host-to-host
# swaps take the torch path.
@pytest.mark.parametrize("use_triton", [False] if ON_CUDA else [False, True])
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_swap_between_host_pools(use_triton, dtype):
    src = make_pool(12, 2, 8, 2, 64, dtype, device=CPU)
    dst = make_pool(9, 2, 8, 2, 64, dtype, device=CPU)
    expected = dst.clone()
    pairs = _pairs(5, 12, 9)
    handle = swap_blocks(src, dst, pairs, use_triton=use_triton)
    handle.wait()
    assert handle.done() and handle.event is None
    expected[pairs[:, 1]] = src[pairs[:, 0]]
    assert torch.equal(dst, expected)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA and pinned host memory")
@pytest.mark.parametrize("direction", ["out", "in"])
def test_swap_gpu_and_pinned_host(direction):
    gpu = make_pool(64, 4, 16, 8, 128, BF16)
    host = make_pool(48, 4, 16, 8, 128, BF16, device=CPU).pin_memory()
    src, dst = (gpu, host) if direction == "out" else (host, gpu)
    pairs = _pairs(20, src.shape[0], dst.shape[0])
    expected = dst.cpu().clone()
    expected[pairs[:, 1]] = src.cpu()[pairs[:, 0]]
    handle = swap_blocks(src, dst, pairs)
    assert isinstance(handle, SwapHandle) and handle.event is not None
    handle.wait()
    assert handle.done()
    assert torch.equal(dst.cpu(), expected)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_swap_sees_writes_queued_before_it():
    gpu = make_pool(8, 1, 16, 2, 64, FP16)
    host = torch.empty_like(gpu, device=CPU).pin_memory()
    gpu[3].fill_(5.0)  # queued on the current stream; the swap stream must wait for it
    swap_blocks(gpu, host, torch.tensor([[3, 1]])).wait()
    assert bool((host[1] == 5.0).all())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda s, d: (s, d[:, :1], torch.tensor([[0, 1]])), id="block-shape"),
        pytest.param(lambda s, d: (s, d.half(), torch.tensor([[0, 1]])), id="dtype"),
        pytest.param(lambda s, d: (s, d, torch.tensor([[12, 1]])), id="src-high"),
        pytest.param(lambda s, d: (s, d, torch.tensor([[0, 9]])), id="dst-high"),
        pytest.param(lambda s, d: (s, d, torch.tensor([[0, 1], [2, 1]])), id="dst-twice"),
        pytest.param(lambda s, d: (s, d, torch.tensor([[0, 1]], dtype=torch.int32)), id="pairs-dtype"),
        pytest.param(lambda s, d: (s, s, torch.tensor([[0, 1]])), id="same-pool"),
        pytest.param(lambda s, d: (s[:, :, 0], d[:, :, 0], torch.tensor([[0, 1]])), id="strided"),
    ],
)
def test_swap_rejects_invalid_input_before_launch(make, monkeypatch):
    monkeypatch.setattr(copy, "_copy_blocks_kernel", LaunchGuard())
    src = make_pool(12, 2, 8, 2, 64, BF16, device=CPU)
    dst = make_pool(9, 2, 8, 2, 64, BF16, device=CPU)
    with pytest.raises(ValueError):
        swap_blocks(*make(src, dst), use_triton=True)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_swap_rejects_unpinned_host_pool():
    gpu = make_pool(4, 1, 8, 1, 64, FP16)
    with pytest.raises(ValueError, match="pinned"):
        swap_blocks(gpu, torch.empty_like(gpu, device=CPU), torch.tensor([[0, 1]]))


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_merge_matches_reference_with_empty_parts(dtype):
    n, h, d = 6, 4, 128
    out_a = torch.randn(n, h, d, device=DEVICE).to(dtype)
    out_b = torch.randn(n, h, d, device=DEVICE).to(dtype)
    lse_a = torch.randn(n, h, device=DEVICE) * 3
    lse_b = torch.randn(n, h, device=DEVICE) * 3
    lse_a[0, :2] = float("-inf")  # part a has no keys
    lse_b[1, 1] = float("-inf")  # part b has no keys
    lse_a[2, 3] = lse_b[2, 3] = float("-inf")  # neither has keys
    got, lse = merge_attn_states(out_a, lse_a, out_b, lse_b, use_triton=True)
    ref, ref_lse = merge_attn_states_ref(out_a, lse_a, out_b, lse_b)
    assert_attention_close(got, ref, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 0], out_b[0, 0]) or dtype != FP32
    assert bool((got[2, 3] == 0).all()) and lse[2, 3] == float("-inf")


def test_merge_of_two_key_halves_is_attention_over_all():
    # Attention over pages [0, k) merged with pages [k, n) equals attention over all n.
    bs, hkv, d = 8, 2, 64
    pool = make_pool(10, 1, bs, hkv, d, FP32)
    k_cache, v_cache = layer_views(pool, 0)
    tables, lens = random_page_tables([72], bs, 10)
    q = torch.randn(1, 4, d, device=DEVICE)
    full, full_lse = paged_decode_ref(q, k_cache, v_cache, tables, lens, return_lse=True)
    first = tables[:, :4].contiguous()
    second = tables[:, 4:9].contiguous()
    a, la = paged_decode_ref(q, k_cache, v_cache, first, lens.clone().fill_(32), return_lse=True)
    b, lb = paged_decode_ref(q, k_cache, v_cache, second, lens.clone().fill_(40), return_lse=True)
    got, lse = merge_attn_states(a, la, b, lb, use_triton=True)
    assert_attention_close(got, full, FP32)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_merge_rejects_bad_shapes():
    a = torch.randn(3, 2, 64, device=DEVICE)
    la = torch.randn(3, 2, device=DEVICE)
    with pytest.raises(ValueError):
        merge_attn_states(a, la, a[:2], la[:2], use_triton=True)
    with pytest.raises(ValueError):
        merge_attn_states(a, la.double(), a, la, use_triton=True)
    with pytest.raises(ValueError):
        merge_attn_states(a, la, a.half(), la, use_triton=True)
