"""Batched CPU decode against the per-sequence torch reference.

The caches are layer views of a block-major pool (strided, not contiguous), and block-table
entries past each sequence's pages hold an out-of-range id, as in the kernel tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import layer_views, make_pool, random_page_tables
from kvservice.kernels import decode, decode_cpu, paged_decode, paged_decode_ref
from kvservice.kernels.decode_cpu import paged_decode_batched, plan_chunks

CPU = torch.device("cpu")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Both sides compute in fp32 from the same inputs: they differ by summation order only,
# then by one rounding step of the output dtype.
OUT_TOL = {FP32: (1e-5, 1e-5), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


def _setup(
    lengths: list[int],
    *,
    dtype: torch.dtype = FP32,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 5
    pool = make_pool(num_blocks, 3, block_size, num_kv_heads, head_dim, dtype, device=CPU)
    k_cache, v_cache = layer_views(pool, 1)
    tables, lens = random_page_tables(lengths, block_size, num_blocks, device=CPU)
    q = torch.randn(len(lengths), num_q_heads, head_dim).to(dtype)
    return q, k_cache, v_cache, tables, lens


def _assert_matches_ref(args: tuple[torch.Tensor, ...], **kwargs: object) -> None:
    q = args[0]
    got, lse = paged_decode_batched(*args, return_lse=True, **kwargs)
    scale = kwargs.get("scale")
    ref, ref_lse = paged_decode_ref(*args, return_lse=True, scale=scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert lse.dtype == FP32 and lse.shape == q.shape[:2]
    atol, rtol = OUT_TOL[q.dtype]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_uneven_lengths_match_reference(dtype: torch.dtype, group: int) -> None:
    # One token, exact multiples of the block size, one past a multiple, and one long.
    lengths = [1, 16, 48, 17, 3, 300, 33]
    _assert_matches_ref(_setup(lengths, dtype=dtype, num_q_heads=2 * group, num_kv_heads=2))


@pytest.mark.parametrize("scale", [None, 0.3, 2.5])
def test_scale(scale: float | None) -> None:
    _assert_matches_ref(_setup([5, 40, 64], num_q_heads=8, num_kv_heads=2), scale=scale)


def test_plain_output_without_lse() -> None:
    args = _setup([7, 29])
    got = paged_decode_batched(*args)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, paged_decode_ref(*args))


@pytest.mark.parametrize("chunk_elements", [1, 2 * 16 * 64, 5 * 16 * 64])
def test_chunked_batches_match_reference(chunk_elements: int) -> None:
    # A token of 2 heads x 32 is 64 elements: the budgets give one sequence per chunk, two
    # blocks' worth per chunk (short sequences grouped, long ones alone) and five blocks'.
    lengths = [200, 1, 16, 70, 3, 33, 100, 9, 16]
    _assert_matches_ref(_setup(lengths, dtype=BF16), chunk_elements=chunk_elements)


def test_chunk_plan_examples() -> None:
    # Blocks of 4 tokens, 1 element per token: a budget of 8 holds two blocks.
    assert plan_chunks([], 4, 1, 8) == []
    assert plan_chunks([3, 1], 4, 1, 8) == [[0, 1]]  # fits: in order, unsorted
    assert plan_chunks([1, 9, 5, 2, 4], 4, 1, 8) == [[1], [2], [4, 3], [0]]
    assert plan_chunks([30], 4, 1, 8) == [[0]]  # too long alone: still one chunk


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=500), max_size=40),
    block_size=st.sampled_from([1, 16, 64]),
    token_elements=st.sampled_from([1, 64, 1024]),
    chunk_elements=st.integers(min_value=1, max_value=2**20),
)
def test_chunk_plan_covers_every_row_within_budget(
    lengths: list[int], block_size: int, token_elements: int, chunk_elements: int
) -> None:
    chunks = plan_chunks(lengths, block_size, token_elements, chunk_elements)
    assert sorted(row for chunk in chunks for row in chunk) == list(range(len(lengths)))

    def padded(chunk: list[int]) -> int:
        longest = max(lengths[row] for row in chunk)
        return len(chunk) * -(-longest // block_size) * block_size * token_elements

    assert all(padded(chunk) <= chunk_elements or len(chunk) == 1 for chunk in chunks)


def test_empty_batch() -> None:
    q, k_cache, v_cache, _, _ = _setup([4])
    tables = torch.empty(0, 3, dtype=torch.int32)
    lens = torch.empty(0, dtype=torch.int32)
    q = q[:0]
    for chunk_elements in (1, 2**22):
        out, lse = paged_decode_batched(
            q, k_cache, v_cache, tables, lens, return_lse=True, chunk_elements=chunk_elements
        )
        assert out.shape == (0, 4, 32) and lse.shape == (0, 4)


def test_results_do_not_share_memory_between_calls() -> None:
    # The gather buffers are reused: a result must never be a view of them.
    first_args = _setup([20, 40], seed=1)
    first = paged_decode_batched(*first_args, return_lse=True)
    kept = [t.clone() for t in first]
    paged_decode_batched(*_setup([40, 20], seed=2), return_lse=True)
    for got, before in zip(first, kept, strict=True):
        torch.testing.assert_close(got, before, atol=0, rtol=0)


def test_scratch_first_taken_under_inference_mode_serves_calls_outside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode_cpu, "_SCRATCH", decode_cpu._Scratch())
    args = _setup([30, 2])
    with torch.inference_mode():
        inside = paged_decode_batched(*args)
    outside = paged_decode_batched(*args)
    torch.testing.assert_close(outside, inside, atol=0, rtol=0)


def test_cpu_dispatch_is_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _setup([9, 3, 40])
    expected = paged_decode_ref(*args, return_lse=True)

    def per_sequence(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the CPU path attended one sequence at a time")

    monkeypatch.setattr(decode, "paged_decode_ref", per_sequence)
    out = torch.empty_like(args[0])
    got, lse = paged_decode(*args, return_lse=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected[1], atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=90), min_size=1, max_size=10),
    dtype=st.sampled_from([FP32, BF16, FP16]),
    num_kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 64]),
    block_size=st.sampled_from([1, 4, 16, 32]),
    chunk_elements=st.sampled_from([1, 300, 4000, 2**22]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_random_shapes_match_reference(
    lengths: list[int],
    dtype: torch.dtype,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    chunk_elements: int,
    seed: int,
) -> None:
    args = _setup(
        lengths,
        dtype=dtype,
        num_q_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        seed=seed,
    )
    _assert_matches_ref(args, chunk_elements=chunk_elements)
