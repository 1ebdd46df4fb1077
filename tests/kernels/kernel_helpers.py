"""Shared builders for the kernel tests: pools, page tables, tolerances.

On CPU the kernels run through Triton's interpreter, so shapes stay small; on CUDA the
same tests run larger shapes (``ON_CUDA``).
"""

from __future__ import annotations

import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# Relative error bounds (norm of the difference over norm of the reference).
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
LSE_ATOL = 2e-3


def make_pool(
    num_blocks: int,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device = DEVICE,
) -> torch.Tensor:
    """A block-major pool filled with random values (never zeros)."""
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, device=device).to(dtype)


def layer_views(pool: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pool[:, layer, 0], pool[:, layer, 1]


def random_page_tables(
    seq_lens: list[int],
    block_size: int,
    num_blocks: int,
    *,
    extra_columns: int = 1,
    device: torch.device = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random blocks per sequence; unused entries hold an id far out of range so a
    kernel that reads past a sequence's pages would fault or produce garbage."""
    needed = [-(-n // block_size) for n in seq_lens]
    width = max(needed, default=0) + extra_columns
    assert sum(needed) <= num_blocks, "pool too small for the test's sequences"
    perm = torch.randperm(num_blocks)
    table = torch.full((len(seq_lens), width), 1 << 30, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        table[b, :n] = perm[used : used + n].int()
        used += n
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return table.to(device), lens.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / max(denom, 1e-30)


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(out).any(), "output holds NaN (unwritten or broken rows)"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.2e} > {REL_TOL[dtype]:.0e} for {dtype}"


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor) -> None:
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), "lse holds NaN"
    torch.testing.assert_close(lse, ref, atol=LSE_ATOL, rtol=1e-4)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


class LaunchGuard:
    """Replaces a jitted kernel so any launch fails the test (validation must come first)."""

    def __getitem__(self, grid: object) -> object:
        raise AssertionError(f"kernel launched (grid {grid}) despite invalid input")


def lazy_huge_pool(num_elements_min: int, block_shape: tuple[int, ...], dtype: torch.dtype):
    """A pool whose element count exceeds ``num_elements_min``.

    On CPU the allocation stays virtual (pages are committed only when touched), so a pool
    past 2**31 elements costs only the blocks a test writes; on CUDA it is real memory.
    Returns None when the allocation is refused.
    """
    per_block = 1
    for d in block_shape:
        per_block *= d
    num_blocks = num_elements_min // per_block + 64
    try:
        return torch.empty((num_blocks, *block_shape), dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError):
        return None
