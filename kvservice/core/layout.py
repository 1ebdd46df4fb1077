"""The shape of one KV-cache block, shared by the core, the kernels and the workers.

A pool is block-major: ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``,
so one block (all layers, K and V) is one contiguous run of bytes and moves as one piece.
The core only needs the sizes; dtype is a name so the core stays free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class Layout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Layout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"Layout.dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (num_layers, 2, block_size, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return (
            self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize
        )

    @property
    def token_bytes(self) -> int:
        """KV bytes one token takes over all layers."""
        return self.block_bytes // self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def key(self) -> str:
        """A stable string naming the layout; part of every prefix hash."""
        return (
            f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-{self.dtype}-B{self.block_size}"
        )
